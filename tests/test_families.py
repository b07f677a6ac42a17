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
from train_args import counting_dataset, train_args
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
from hf_moeprune.demo.tiny_models import tiny_config, tiny_model
from hf_moeprune.quantization import quantize, quantized_targets
from hf_moeprune.training import MoEPruneTrainer

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
    """Reversed (so also permuted) ids per prunable MoE layer, a whole number per group; per-layer counts differ unless
    ``uniform``. Layers that must keep all their experts (DeepSeek-V4's hash layers) are left out, so a ``uniform``
    layout keeps every expert (reversed) in the other layers too."""
    groups = adapter.num_groups(model.config)
    size = adapter.num_experts_in_config(model.config) // groups
    keeps_all_somewhere = bool(adapter.keep_all_layers(model.config))
    plan = {}
    for n, layer in enumerate(adapter.prunable_layer_indices(model)):
        per_group = size - 2 if n % 2 else size - 1
        if uniform:
            per_group = size if keeps_all_somewhere else size - 2
        plan[layer] = [g * size + i for g in range(groups) for i in range(per_group)][::-1]
    return plan


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _routed_pairs(model, adapter) -> dict[int, int]:
    """(token, slot) pairs each MoE layer's router sends to a routed expert on IDS, read off the router's own indices
    (a route to an extra router row, LongCat's zero-computation experts, is not one)."""
    layers = adapter.decoder_layers(model)
    found, handles = {}, []
    for i in adapter.moe_layer_indices(model):
        limit = adapter.num_experts(layers[i])

        def hook(module, args, output, i=i, limit=limit):
            indices = adapter.unpack_router_output(module, output)[2]  # Llama 4 returns (scores, logits)
            found[i] = found.get(i, 0) + int((indices < limit).sum())

        handles.append(adapter.router(layers[i]).register_forward_hook(hook))
    _logits(model)
    for handle in handles:
        handle.remove()
    return found


@pytest.mark.parametrize("family", SUPPORTED)
def test_registration_matches_the_model(family):
    """The declaration agrees with what the modeling code exposes, and its rule reproduces the stock router."""
    model = tiny_model(family)
    declared, found = ADAPTERS[family], discover_adapter(model)
    fields = ("block_attr", "router_attr", "expert_tensors", "block_tensors", "config_class", "model_class")
    extra_rows = ("extra_rows_field", "extra_row_tensors", "routed_count_attributes", "total_count_attributes")
    for field in (
        *fields,
        "text_config_attr",
        "layers_path",
        "auto_class",
        *extra_rows,
        "layers_field",
        "router_output",
        "experts_call",
    ):
        assert getattr(declared, field) == getattr(found, field), field
    assert (
        set(declared.router_tensors) == set(found.router_tensors)
        and declared.router_tensors[0] == found.router_tensors[0]
    )
    # layers whose router needs more than the hidden states keep all their experts; discovery names them the same way
    keep_all = [
        (k.keep_all_experts.layer_types_field, k.keep_all_experts.values, k.keep_all_experts.tables)
        if k.keep_all_experts
        else None
        for k in (declared, found)
    ]
    assert keep_all[0] == keep_all[1]
    layers = declared.decoder_layers(model)
    for index in declared.keep_all_layers(model.config):
        for name in declared.keep_all_experts.tables:
            table = getattr(declared.router(layers[index]), name)
            assert not table.is_floating_point() and 0 <= table.min() <= table.max() < declared.num_experts(
                layers[index]
            )
    layer = layers[declared.prunable_layer_indices(model)[0]]
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
    counts = [model.config.experts_per_layer[i] for i in moe_layers]
    assert counts == [len(plan[i]) if i in plan else 8 for i in moe_layers]  # keep-all layers keep their 8
    if len(plan) > 1:
        assert len({len(kept) for kept in plan.values()}) == 2  # a real per-layer layout
    expected = _logits(model)
    routed = _routed_pairs(model, adapter)
    loads = measure_expert_loads(model, [{"input_ids": IDS}], progress=False)  # routing statistics via the adapter
    assert [loads[i].numel() for i in moe_layers] == counts
    assert all(loads[i].sum() == routed[i] for i in moe_layers)
    if adapter.extra_rows_field is None:
        assert all(routed[i] == IDS.numel() * adapter.top_k(model.config) for i in moe_layers)

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
    assert adapter.moe_config(config)[adapter.num_experts_field] == len(next(iter(plan.values())))
    stock = auto.from_pretrained(tmp_path / "stock")
    assert type(stock).__name__ == adapter.model_class
    torch.testing.assert_close(_logits(stock), expected, rtol=0, atol=1e-6)


# The default run loads a few families added in 2026-12 (the per-family deep suite covers the first 15 one by one);
# the slow run loads every registered family.
REMOTE_DEFAULT = [
    "ernie4_5_moe", "glm4_moe_lite", "granitemoehybrid", "minimax_m2", "nemotron_h", "qwen3_5_moe_text", "qwen3_vl_moe",
    "sarvam_mla",  # a config class of its own on DeepseekV3ForCausalLM: the pruned class named after both
    "ergo",  # a per-expert tensor in a submodule of the experts (post_expert_norm.weight)
    "gemma4",  # a composite whose class is also its causal-LM class, router and experts in the decoder layer
    "longcat_flash",  # zero-computation experts: router rows after the routed ones, reindexed by the new count
    "inkling_text",  # shared experts' router rows after the routed ones; its rule reads the router's input
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
    from hf_moeprune.adapters.base import RULE_RENORMALIZES
    from hf_moeprune.adapters.table import RULES

    assert set(RULES) == set(RULE_RENORMALIZES)  # the README table describes every rule in words
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


def test_selection_bias_on_softmax_group_limited_routing(tmp_path):
    """Mistral-Small-4's rule (softmax, 2 groups ranked by their top-2 sum, one kept): zero bias changes nothing, a
    large entry pulls its expert's group in and forces the expert, the losing group stays out also when every biased
    score is negative (the stock router's 0.0 fill would let it back in), and the bias reloads."""
    from hf_moeprune.format import enable_selection_bias

    model = tiny_model("mistral4")
    adapter = hf_moeprune.get_adapter(model)
    assert adapter.routing == "softmax_group_limited" and adapter.num_groups(model.config) == 2
    expected = _logits(model)
    enable_selection_bias(model, adapter)
    assert torch.equal(_logits(model), expected)
    layer = adapter.decoder_layers(model)[adapter.moe_layer_indices(model)[0]]
    router = adapter.router(layer)
    chosen = []
    router.register_forward_hook(lambda module, args, output: chosen.append(output[2]))
    with torch.no_grad():
        router.selection_bias[5] = 100.0
    forced = _logits(model)
    assert not torch.equal(forced, expected) and (chosen[-1] == 5).any(dim=-1).all()
    assert (chosen[-1] >= 4).all()  # topk_group=1: the other expert comes from expert 5's group as well
    with torch.no_grad():  # every biased score negative, group 0 ahead: a 0.0 fill would let group 1 back in
        router.selection_bias[:4] = -0.2
        router.selection_bias[4:] = -0.5
    masked = _logits(model)
    assert (chosen[-1] < 4).all() and not torch.equal(masked, expected)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(getattr(transformers, adapter.auto_class).from_pretrained(tmp_path)), masked)


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
    args = train_args(
        tmp_path / "run",
        max_steps=4,
        prune_target=0.25,
        prune_criterion="reap",
        prune_schedule="oneshot",
        prune_start_step=2,
        prune_end_step=3,
    )
    experts_before = adapter.experts(adapter.decoder_layers(model)[adapter.moe_layer_indices(model)[-1]])
    down_before = experts_before.down_proj.detach().clone()
    trainer = MoEPruneTrainer(model=model, args=args, train_dataset=counting_dataset())
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
        name.startswith(f"{adapter.layers_path or 'model.layers'}.") and f".{adapter.experts_path}." in name
        for name in quantized_targets(model)
    )
    out = _logits(model)
    assert torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.99
    greedy = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert model.generate(IDS[:1], generation_config=greedy).shape == (1, IDS.shape[1] + 3)


# -- router rows after the routed experts (issue 13) -----------------------------------------------------------------
def _router_rows(model, adapter) -> dict[int, dict[str, torch.Tensor]]:
    layers = adapter.decoder_layers(model)
    return {
        i: {name: adapter.router(layers[i]).get_parameter(name).detach().clone() if name.endswith("weight")
            else adapter.router(layers[i]).get_buffer(name).clone() for name in adapter.router_tensors}
        for i in adapter.moe_layer_indices(model)
    }  # fmt: skip


def test_longcat_zero_experts_survive_pruning_and_are_still_reached(tmp_path):
    """LongCat-Flash's zero-computation experts (router rows n_routed_experts + j) keep their rows bit for bit after
    pruning, still at the end; the pruned model is the stock model of the new routed count with the kept weights (so
    its index arithmetic reaches the zero experts), and the statistics count routed experts only."""
    from hf_moeprune.observation import observe_routing

    model = tiny_model("longcat_flash")
    adapter = hf_moeprune.get_adapter(model)
    layers = adapter.decoder_layers(model)
    torch.manual_seed(3)
    with torch.no_grad():  # varied routing: router rows that matter more than the correction bias
        for i in adapter.moe_layer_indices(model):
            adapter.router(layers[i]).classifier.weight.normal_(0.0, 1.0)
            adapter.router(layers[i]).e_score_correction_bias.normal_(0.0, 0.01)
    routed = _routed_pairs(model, adapter)
    pairs = IDS.numel() * adapter.top_k(model.config)
    assert all(0 < routed[i] < pairs for i in routed)  # some routes go to zero experts, some to routed ones
    stats = observe_routing(model, [{"input_ids": IDS}], progress=False).snapshot()
    for i in adapter.moe_layer_indices(model):  # REAP's pairs exclude the zero experts' placeholder routes too
        assert stats[i].tokens.numel() == 8 and stats[i].tokens.sum() == routed[i]
        assert torch.equal(stats[i].reap_tokens, stats[i].tokens)
    before = _router_rows(model, adapter)
    experts_before = {
        i: adapter.experts(layers[i]).down_proj.detach().clone() for i in adapter.moe_layer_indices(model)
    }
    original = {k: v.clone() for k, v in model.state_dict().items()}

    keep = {0: [6, 1, 4, 0, 7], 1: [2, 5, 3, 6, 0]}  # reordered too: rows follow the order given
    prune_experts(model, keep)
    zero = model.config.zero_expert_num
    for i, kept in keep.items():
        after = _router_rows(model, adapter)[i]
        for name, rows in before[i].items():
            assert torch.equal(after[name][: len(kept)], rows[kept])
            assert torch.equal(after[name][len(kept) :], rows[-zero:])  # the zero experts, unpruned, in order
        assert torch.equal(adapter.experts(layers[i]).down_proj, experts_before[i][kept])
        assert adapter.num_experts(layers[i]) == len(kept) and adapter.moe_block(layers[i]).num_routed_experts == 5
        assert adapter.router(layers[i]).n_routed_experts == len(kept) + zero
    assert model.config.n_routed_experts == 5 and model.config.zero_expert_num == zero
    logits = _logits(model)

    # the stock model built for 5 routed experts, given the kept rows by hand, computes the same logits
    config = tiny_config("longcat_flash", n_routed_experts=5)
    reference = AutoModelForCausalLM.from_config(config).eval()
    state = {}
    for key, value in original.items():
        match = re.match(r"model\.layers\.(\d+)\.mlp\.(router\.classifier\.weight|router\.e_score_correction_bias|"
                         r"experts\.gate_up_proj|experts\.down_proj)$", key)  # fmt: skip
        if match is None:
            state[key] = value
            continue
        kept = torch.tensor(keep[int(match.group(1))])
        if match.group(2).startswith("router"):
            kept = torch.cat((kept, torch.arange(8, 8 + zero)))
        state[key] = value[kept]
    reference.load_state_dict(state, strict=True)
    assert torch.equal(_logits(reference), logits)

    model.save_pretrained(tmp_path, export_stock=False)
    assert json.loads((tmp_path / "config.json").read_text())["expert_extra_rows_field"] == "zero_expert_num"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded), logits)
    for i in keep:
        for name, rows in _router_rows(reloaded, adapter)[i].items():
            assert torch.equal(rows[-zero:], before[i][name][-zero:])


def test_inkling_shared_rows_survive_pruning_and_unrouted_experts_leave_logits_unchanged(tmp_path):
    """Inkling's shared experts' router rows stay at the end bit for bit; removing the routed experts no token chose
    leaves the logits as they were (per-expert sigmoids, normalised over the chosen and the shared experts): bit for
    bit equal to the stock model built for the kept count with the kept rows, and equal to the unpruned model's up to
    the router matmul's rounding (CPU BLAS rounds some output columns of ``x @ W.T`` differently once W has fewer rows:
    measured 2.3e-10). Its selection bias recomputes the shared experts' weights, which depend on the choice."""
    from hf_moeprune.format import enable_selection_bias

    ids = IDS[:1, :3]  # 3 tokens x top-2: most routed experts stay unchosen
    model = tiny_model("inkling_text")
    adapter = hf_moeprune.get_adapter(model)
    layers = adapter.decoder_layers(model)
    moe_layers = adapter.moe_layer_indices(model)
    chosen = {}
    handles = [
        adapter.router(layers[i]).register_forward_hook(lambda m, a, out, i=i: chosen.__setitem__(i, out[2]))
        for i in moe_layers
    ]
    with torch.no_grad():
        expected = model(ids).logits
    for handle in handles:
        handle.remove()
    keep = {i: sorted(set(chosen[i].flatten().tolist())) for i in moe_layers}
    assert all(2 <= len(kept) < 8 for kept in keep.values()), keep
    keep = {i: keep[i] + [e for e in range(8) if e not in keep[i]][: 4 - len(keep[i])] for i in moe_layers}  # 4 each
    shared = model.config.n_shared_experts
    before = _router_rows(model, adapter)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prune_experts(model, keep)
    for i, kept in keep.items():
        after = _router_rows(model, adapter)[i]
        assert torch.equal(after["weight"][: len(kept)], before[i]["weight"][kept])
        assert torch.equal(after["weight"][len(kept) :], before[i]["weight"][-shared:])  # the shared experts' rows
        assert torch.equal(after["e_score_correction_bias"], before[i]["e_score_correction_bias"][kept])
        assert adapter.router(layers[i]).n_total_experts == len(kept) + shared
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-8)
    reference = AutoModelForCausalLM.from_config(tiny_config("inkling_text", n_routed_experts=4)).eval()
    state = {}
    for key, value in original.items():
        match = re.match(r"model\.layers\.(\d+)\.mlp\.(gate\.weight|gate\.e_score_correction_bias|experts\.\w+)$", key)
        if match is None:
            state[key] = value
            continue
        rows = torch.tensor(keep[int(match.group(1))])
        if match.group(2) == "gate.weight":
            rows = torch.cat((rows, torch.arange(8, 8 + shared)))
        state[key] = value[rows]
    reference.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, logits)

    model.save_pretrained(tmp_path / "pruned", export_stock=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)

    # a selection bias forcing expert 1 gives what the stock router gives with that bias in its correction bias: the
    # shared experts' weights follow the new choice
    biased, reference = tiny_model("inkling_text"), tiny_model("inkling_text")
    enable_selection_bias(biased, adapter)
    with torch.no_grad():
        for model_, name in ((biased, "selection_bias"), (reference, "e_score_correction_bias")):
            for i in moe_layers:
                getattr(adapter.router(adapter.decoder_layers(model_)[i]), name)[1] += 100.0
        out, ref, plain = biased(IDS).logits, reference(IDS).logits, tiny_model("inkling_text")(IDS).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)
    assert (out - plain).abs().max() > 1e-6  # the tiny model's logits are ~1e-2: forcing an expert shows
