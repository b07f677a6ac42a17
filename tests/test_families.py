"""Every MoE causal-LM family of the installed transformers: registered (and then working end to end on a tiny
model of its own config class) or listed as unsupported with a reason.

The family list is read from transformers at run time, so a transformers upgrade that adds a MoE family fails
`test_every_installed_moe_family_is_registered` until someone registers it (one `register_family` call) or
lists it with a reason.
"""

import dataclasses
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES, run_without_package
from datasets import Dataset
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

import hf_moeprune
from hf_moeprune import prune_experts
from hf_moeprune.adapters import ADAPTERS, UNSUPPORTED
from hf_moeprune.adapters.base import COUNT_FIELD_CANDIDATES
from hf_moeprune.adapters.discovery import block_router_args, discover_adapter, identify_routing, router_top_k
from hf_moeprune.balancing.loads import measure_expert_loads
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.quantization import quantize, quantized_targets
from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer

SUPPORTED = sorted(ADAPTERS)
IDS = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(5))


def installed_moe_families() -> list[str]:
    """model_types with a causal-LM or image-text-to-text class whose config (or, for composite configs, text config)
    declares a routed expert count: the text families and the vision-language ones whose language model is an MoE."""
    found = []
    for model_type in dict.fromkeys([*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES]):
        try:
            config_cls = CONFIG_MAPPING[model_type]
        except (KeyError, ImportError):
            continue
        config_cls = (getattr(config_cls, "sub_configs", None) or {}).get("text_config", config_cls)
        if not dataclasses.is_dataclass(config_cls):
            continue
        declared = {f.name for f in dataclasses.fields(config_cls)} | set(getattr(config_cls, "attribute_map", {}))
        if declared & set(COUNT_FIELD_CANDIDATES):
            found.append(model_type)
    return found


def test_every_declared_family_is_in_the_installed_transformers():
    # families newer than the installed transformers are skipped at registration (so the lower bound imports);
    # with the tested transformers none may be, which also catches a misspelt model_type
    from hf_moeprune.adapters.base import NOT_INSTALLED

    assert not NOT_INSTALLED, sorted(NOT_INSTALLED)


def test_every_installed_moe_family_is_registered():
    installed = installed_moe_families()
    assert len(installed) > 50  # transformers 5.24 has ~65; a broken enumeration must not pass silently
    missing = [m for m in installed if m not in ADAPTERS and m not in UNSUPPORTED]
    assert not missing, (
        f"MoE families of this transformers that are neither registered nor listed as unsupported: {missing}; "
        f"register each in hf_moeprune/adapters/families.py (adapters.discovery.discover_adapter(model) derives "
        f"the declaration) or call register_unsupported(model_type, reason)"
    )
    assert any(
        m in installed for m in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if m not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    enumerated = {*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}
    assert set(installed) >= set(UNSUPPORTED) - {m for m in UNSUPPORTED if m not in enumerated}


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED))
def test_unsupported_family_raises_its_reason(model_type):
    config = CONFIG_MAPPING[model_type]()
    with pytest.raises(ValueError, match="is not supported: " + re.escape(UNSUPPORTED[model_type][:20])):
        hf_moeprune.get_adapter(config)


def _keep_plan(model, adapter, uniform: bool) -> dict[int, list[int]]:
    """Reversed (so also permuted) ids per MoE layer, a whole number per group; per-layer counts differ unless
    ``uniform``."""
    groups = adapter.num_groups(model.config)
    size = adapter.num_experts_in_config(model.config) // groups
    plan = {}
    for n, layer in enumerate(adapter.moe_layer_indices(model)):
        per_group = size - 2 if uniform or n % 2 else size - 1
        plan[layer] = [g * size + i for g in range(groups) for i in range(per_group)][::-1]
    return plan


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", SUPPORTED)
def test_registration_matches_the_model(family):
    """The declaration agrees with what the modeling code exposes, and its rule reproduces the stock router."""
    model = tiny_model(family)
    declared, found = ADAPTERS[family], discover_adapter(model)
    fields = ("block_attr", "router_attr", "expert_tensors", "block_tensors", "config_class", "model_class")
    for field in (*fields, "text_config_attr", "layers_path", "auto_class", "router_output", "experts_call"):
        assert getattr(declared, field) == getattr(found, field), field
    assert (
        set(declared.router_tensors) == set(found.router_tensors)
        and declared.router_tensors[0] == found.router_tensors[0]
    )
    layer = declared.decoder_layers(model)[declared.moe_layer_indices(model)[0]]
    assert declared.num_experts_in_config(model.config) == declared.num_experts(layer) == 8
    assert (
        declared.top_k(model.config)
        == router_top_k(declared.router(layer), declared.moe_config(model.config).hidden_size)
        == 2
    )
    router_args = block_router_args(declared.moe_block(layer), declared.block_tensors)
    assert declared.routing in identify_routing(
        declared.router(layer), declared.moe_config(model.config).hidden_size, router_args=router_args
    )
    assert declared.moe_layer_indices(model), family


@pytest.mark.parametrize("family", SUPPORTED)
def test_prune_save_reload_export_generate(family, tmp_path):
    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    moe_layers = adapter.moe_layer_indices(model)
    plan = _keep_plan(model, adapter, uniform=False)
    prune_experts(model, plan)
    counts = [c for c in model.config.experts_per_layer if c is not None]
    assert counts == [len(plan[i]) for i in moe_layers]
    if len(moe_layers) > 1:
        assert len(set(counts)) == 2  # a real per-layer layout
    expected = _logits(model)
    loads = measure_expert_loads(model, [{"input_ids": IDS}], progress=False)  # routing statistics via the adapter
    assert [loads[i].numel() for i in moe_layers] == counts
    assert all(loads[i].sum() == IDS.numel() * adapter.top_k(model.config) for i in moe_layers)

    # export_stock=False: the hf_moeprune format even where one MoE layer makes the layout uniform
    model.save_pretrained(tmp_path / "pruned", export_stock=False)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == f"moeprune_{family}" and config["expert_count_field"] == adapter.num_experts_field
    # a model class shared by several config classes (Sarvam's) is named after both: MoEPrune<Model>__<Config>
    pruned_class = config["auto_map"][adapter.auto_class]
    assert pruned_class.split("__")[0] == f"modeling_moeprune.MoEPrune{adapter.model_class}"
    assert (tmp_path / "pruned" / "modeling_moeprune.py").exists()
    auto = getattr(transformers, adapter.auto_class)  # AutoModelForImageTextToText for vision-language families
    reloaded = auto.from_pretrained(tmp_path / "pruned")
    assert type(reloaded).__name__ == pruned_class.split(".")[1]
    assert [adapter.num_experts(adapter.decoder_layers(reloaded)[i]) for i in moe_layers] == counts
    assert torch.equal(_logits(reloaded), expected)
    greedy = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(
        model.generate(IDS[:1], generation_config=greedy), reloaded.generate(IDS[:1], generation_config=greedy)
    )

    uniform = tiny_model(family)
    plan = _keep_plan(uniform, adapter, uniform=True)
    prune_experts(uniform, plan)
    expected = _logits(uniform)
    uniform.save_pretrained(tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert adapter.moe_config(config)[adapter.num_experts_field] == len(plan[moe_layers[0]])
    stock = auto.from_pretrained(tmp_path / "stock")
    assert type(stock).__name__ == adapter.model_class
    torch.testing.assert_close(_logits(stock), expected, rtol=0, atol=1e-6)


# The default run loads a few families added in 2026-12 (the per-family deep suite covers the first 15 one by one);
# the slow run loads every registered family.
REMOTE_DEFAULT = [
    "ernie4_5_moe", "glm4_moe_lite", "granitemoehybrid", "minimax_m2", "nemotron_h", "qwen3_5_moe_text", "qwen3_vl_moe",
    "sarvam_mla",  # a config class of its own on DeepseekV3ForCausalLM: the pruned class named after both
]  # fmt: skip


@pytest.mark.parametrize(
    "families", [pytest.param(REMOTE_DEFAULT, id="new"), pytest.param(SUPPORTED, id="all", marks=pytest.mark.slow)]
)
def test_families_load_with_trust_remote_code_without_the_package(families, tmp_path):
    """One subprocess without hf_moeprune loads each family's per-layer checkpoint and reproduces its logits."""
    checkpoints, auto_classes = [], {}
    for family in families:
        model = tiny_model(family)
        adapter = hf_moeprune.get_adapter(model)
        prune_experts(model, _keep_plan(model, adapter, uniform=False))
        model.save_pretrained(tmp_path / family, export_stock=False)
        torch.save(_logits(model), tmp_path / family / "expected.pt")
        checkpoints.append(family)
        auto_classes[family] = adapter.auto_class
    torch.save(IDS, tmp_path / "ids.pt")
    code = textwrap.dedent(
        f"""
        import torch
        import transformers
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        for family, auto_class in {auto_classes!r}.items():
            path = {str(tmp_path)!r} + "/" + family
            m = getattr(transformers, auto_class).from_pretrained(path, trust_remote_code=True)
            assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
            with torch.no_grad():
                out = m(ids).logits
            expected = torch.load(path + "/expected.pt")
            print("REMOTE_OK" if torch.equal(out, expected) else "REMOTE_DIFF", family, (out - expected).abs().max().item())
        """
    )
    result = run_without_package(code, cwd=tmp_path)
    ok = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("REMOTE_OK")]
    assert ok == checkpoints, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(checkpoints) == len(families)


def test_readme_family_tables_are_generated_from_the_registry():
    from hf_moeprune.adapters.table import replace_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert replace_table(readme) == readme, (
        "README family tables are stale: python -m hf_moeprune.adapters.table README.md"
    )
    for name in [*ADAPTERS, *UNSUPPORTED]:
        assert f"| {name} |" in readme


def test_an_unregistered_family_is_derived_from_the_model(tmp_path, monkeypatch, caplog):
    """Generic first: a family nobody registered prunes, saves and reloads from what its modules expose."""
    model = tiny_model("solar_open")
    declared = ADAPTERS["solar_open"]
    monkeypatch.delitem(ADAPTERS, "solar_open")
    with pytest.raises(ValueError, match="not a supported MoE family"):
        hf_moeprune.get_adapter(model.config)  # a bare config has nothing to derive from
    with caplog.at_level("WARNING"):
        derived = hf_moeprune.get_adapter(model)
    assert "not registered" in caplog.text and ADAPTERS["solar_open"] is derived
    assert (derived.routing, derived.router_tensors, derived.num_experts_field) == (
        declared.routing,
        declared.router_tensors,
        declared.num_experts_field,
    )
    prune_experts(model, _keep_plan(model, derived, uniform=False))
    expected = _logits(model)
    model.save_pretrained(tmp_path, export_stock=False)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), expected)


def test_registration_checks_the_remote_code_file_and_quantization():
    from hf_moeprune.adapters import register_family
    from hf_moeprune.adapters.routing import ROUTE_FUNCTIONS, register_route_function
    from hf_moeprune.format import modeling_moeprune

    source = Path(modeling_moeprune.__file__).read_text()
    for adapter in ADAPTERS.values():  # every rule a family uses ships in the trust_remote_code file
        assert f"\ndef {adapter.routing}(" in source, adapter.model_type
    register_route_function("test_only_rule")(ROUTE_FUNCTIONS["softmax_topk_renorm"])
    try:
        with pytest.raises(ValueError, match="not defined in format/modeling_moeprune.py"):
            register_family(
                hf_moeprune.MoEAdapter(
                    model_type="olmo2", routing="test_only_rule", num_experts_field="x", top_k_field="y"
                )
            )
    finally:
        del ROUTE_FUNCTIONS["test_only_rule"]
    with pytest.raises(ValueError, match="would be quantized"):
        register_family(
            hf_moeprune.MoEAdapter(model_type="olmo2", router_attr="selector", num_experts_field="x", top_k_field="y")
        )
    assert "olmo2" not in ADAPTERS


@pytest.mark.parametrize("family", ["minimax_m2", "lfm2_moe", "ernie4_5_moe", "afmoe"])
def test_selection_bias_on_families_with_their_own_bias(family, tmp_path):
    """The learned selection bias composes with a block-held (MiniMax-M2, LFM2) or [1, experts] (Ernie) bias: zero
    changes nothing, a large entry forces its expert, and it is saved and reloaded."""
    from hf_moeprune.format import enable_selection_bias

    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    expected = _logits(model)
    enable_selection_bias(model, adapter)
    assert torch.equal(_logits(model), expected)
    layer = adapter.decoder_layers(model)[adapter.moe_layer_indices(model)[0]]
    chosen = []
    adapter.router(layer).register_forward_hook(lambda module, args, output: chosen.append(output[2]))
    with torch.no_grad():
        adapter.router(layer).selection_bias[5] = 100.0
    biased = _logits(model)
    assert not torch.equal(biased, expected) and (chosen[-1] == 5).any(dim=-1).all()
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), biased)


def _rule_representatives() -> list[str]:
    """One registered family per routing rule that the per-family deep suite (conftest.FAMILIES) does not run: the
    first registered (the looped Inkling-2 follows the plain one, and trains far slower)."""
    covered = {ADAPTERS[f].routing for f in FAMILIES}
    first = {}
    for name in ADAPTERS:
        first.setdefault(ADAPTERS[name].routing, name)
    return sorted(name for rule, name in first.items() if rule not in covered)


@pytest.mark.parametrize("family", _rule_representatives())
def test_family_trains_prunes_by_reap_quantizes_and_generates(family, tmp_path):
    """The trainer prunes by REAP while fine-tuning, and the result quantizes and generates, on one family of every
    routing rule outside the deep suite (PhiMoE: its router samples in training, the trainer observes the samples)."""
    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    start = torch.randint(3, 60, (16, 1), generator=torch.Generator().manual_seed(0))
    ids = start + torch.arange(12)  # next token = token + 1, ids < 99 (the smallest tiny vocabulary)
    args = MoEPruneArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        prune_target=0.25,
        prune_criterion="reap",
        prune_schedule="oneshot",
        prune_start_step=2,
        prune_end_step=3,
        disable_tqdm=True,
    )
    experts_before = adapter.experts(adapter.decoder_layers(model)[adapter.moe_layer_indices(model)[-1]])
    down_before = experts_before.down_proj.detach().clone()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trainer = MoEPruneTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    model = trainer.model.eval()
    counts = [c for c in model.config.experts_per_layer if c is not None]
    assert sum(counts) == 6 * len(counts)  # 25% of 8 experts per MoE layer, allocated over the layers
    kept = model.config.kept_expert_ids[adapter.moe_layer_indices(model)[-1]]
    down_after = adapter.experts(adapter.decoder_layers(model)[adapter.moe_layer_indices(model)[-1]]).down_proj
    assert not torch.equal(down_after.detach(), down_before[kept])  # the kept experts trained

    expected = _logits(model)
    quantize(model, "int8")
    assert any(
        name.startswith("model.layers.") and f".{adapter.experts_path}." in name for name in quantized_targets(model)
    )
    out = _logits(model)
    assert torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.99
    greedy = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert model.generate(IDS[:1], generation_config=greedy).shape == (1, IDS.shape[1] + 3)
