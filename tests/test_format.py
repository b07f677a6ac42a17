import json
import textwrap

import pytest
import torch
from conftest import run_without_package
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import hf_moeprune
from hf_moeprune import prune_experts
from hf_moeprune.demo.tiny_models import tiny_model

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))


def _hetero_keep(model):
    adapter = hf_moeprune.get_adapter(model)
    groups = adapter.num_groups(model.config)
    keep = {}
    for n, layer in enumerate(adapter.moe_layer_indices(model)):
        count = 8 - 2 * (n % 2) if groups == 1 else 8 - 2 * groups * (n % 2)
        keep[layer] = list(range(count))[::-1]
    return keep


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_roundtrip_with_package(family, tmp_path):
    model = tiny_model(family)
    prune_experts(model, _hetero_keep(model))
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"moeprune_{family}"
    assert config["base_model_type"] == family
    assert config["experts_per_layer"] == model.config.experts_per_layer
    assert len(set(c for c in config["experts_per_layer"] if c)) == 2
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_moeprune.")
    assert (tmp_path / "modeling_moeprune.py").exists()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == type(model).__name__
    assert reloaded.config.kept_expert_ids == model.config.kept_expert_ids
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), name
    assert torch.equal(_logits(reloaded), expected)


def test_loading_builds_pruned_shapes_directly(tmp_path):
    """from_pretrained must never materialise the original expert count."""
    model = tiny_model("mixtral", num_local_experts=64)
    prune_experts(model, {0: list(range(4)), 1: list(range(6)), 2: list(range(2))})
    model.save_pretrained(tmp_path)
    created = []
    original_empty = torch.empty

    def spy(*shape, **kwargs):
        t = original_empty(*shape, **kwargs)
        created.append(tuple(t.shape))
        return t

    torch.empty = spy
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        torch.empty = original_empty
    assert not [s for s in created if s and s[0] == 64], created
    assert reloaded.config.experts_per_layer == [4, 6, 2]
    # direct construction from the config also yields the pruned shapes
    fresh = AutoModelForCausalLM.from_config(reloaded.config)
    assert [layer.mlp.experts.gate_up_proj.shape[0] for layer in fresh.model.layers] == [4, 6, 2]
    assert fresh.model.layers[1].mlp.experts.gate_up_proj.std() > 0


def test_roundtrip_with_trust_remote_code_without_package(family, tmp_path):
    model = tiny_model(family)
    prune_experts(model, _hetero_keep(model))
    torch.save(IDS, tmp_path / "ids.pt")
    torch.save(_logits(model), tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "model")
    code = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        try:
            import hf_moeprune
            raise SystemExit("hf_moeprune should not be importable here")
        except ImportError:
            pass
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        with torch.no_grad():
            out = m(torch.load({str(tmp_path / "ids.pt")!r})).logits
        assert torch.equal(out, torch.load({str(tmp_path / "expected.pt")!r})), (out - torch.load({str(tmp_path / "expected.pt")!r})).abs().max()
        print("REMOTE_OK", type(m).__name__, m.config.experts_per_layer)
        """
    )
    result = run_without_package(code, cwd=tmp_path)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


def test_uniform_pruning_exports_stock_architecture(tmp_path):
    model = tiny_model("mixtral")
    prune_experts(model, {i: [7, 2, 4, 1] for i in range(3)})
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 4
    assert "auto_map" not in config and not (tmp_path / "modeling_moeprune.py").exists()
    assert config["moeprune_provenance"]["kept_expert_ids"] == [[7, 2, 4, 1]] * 3
    assert "experts_per_layer" not in config
    # the in-memory model is still the pruned class after the export
    assert hf_moeprune.is_pruned(model) and model.config.model_type == "moeprune_mixtral"
    torch.save(IDS, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, MixtralForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        assert type(m) is MixtralForCausalLM
        out = m(torch.load({str(tmp_path / "ids.pt")!r})).logits
        torch.testing.assert_close(out, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=1e-6)
        print("STOCK_OK")
        """
    )
    result = run_without_package(code)
    assert "STOCK_OK" in result.stdout, result.stderr[-3000:]


def test_stock_export_provenance_survives_a_second_pruning(tmp_path):
    model = tiny_model("qwen3_moe")
    prune_experts(model, {i: [7, 5, 3, 1] for i in range(3)})
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.model_type == "qwen3_moe"
    prune_experts(reloaded, {0: [1, 2]})
    assert reloaded.config.kept_expert_ids[0] == [5, 3]
    assert reloaded.config.kept_expert_ids[1] == [7, 5, 3, 1]
    assert reloaded.config.original_num_experts == 8


def test_uniform_export_opt_out(tmp_path):
    model = tiny_model("olmoe")
    prune_experts(model, {i: [0, 1, 2] for i in range(3)})
    model.save_pretrained(tmp_path, export_stock=False)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "moeprune_olmoe"
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(model))


def test_mixtral_stock_export_writes_legacy_keys_and_pruned_format_writes_fused(tmp_path):
    model = tiny_model("mixtral")
    prune_experts(model, {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]})
    model.save_pretrained(tmp_path / "stock")
    model.save_pretrained(tmp_path / "pruned", export_stock=False)
    with safe_open(tmp_path / "pruned" / "model.safetensors", "pt") as f:
        shape = f.get_slice("model.layers.2.mlp.experts.gate_up_proj").get_shape()
    assert shape == [3, 96, 32]


def _corrupt(tmp_path, mutate):
    model = tiny_model("mixtral")
    prune_experts(model, {0: [0, 1, 2], 1: [0, 1, 2, 3, 4]})
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    mutate(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c.__setitem__("experts_per_layer", [3, 4, 8]),
            r"layer 1: experts_per_layer=4 but kept_expert_ids lists 5",
        ),
        (lambda c: c.pop("kept_expert_ids"), r"missing field\(s\) \['kept_expert_ids'\]"),
        (lambda c: c.__setitem__("experts_per_layer", [3, 5]), "experts_per_layer has 2 entries"),
        (lambda c: c["kept_expert_ids"].__setitem__(0, [0, 1, 9]), r"layer 0: kept_expert_ids=\[0, 1, 9\]"),
        (lambda c: c["experts_per_layer"].__setitem__(2, 0), r"layer 2: experts_per_layer=0"),
    ],
)
def test_corrupt_config_fails_at_load_naming_layer(tmp_path, mutate, message):
    _corrupt(tmp_path, mutate)
    with pytest.raises(hf_moeprune.PrunedConfigError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_counts_not_matching_weights_fail_at_load(tmp_path):
    def swap(config):
        config["experts_per_layer"] = [5, 3, 8]
        config["kept_expert_ids"] = [[0, 1, 2, 3, 4], [0, 1, 2], list(range(8))]

    _corrupt(tmp_path, swap)
    # the per_layer_config record (transformers' convention) still says the saved counts: refused, naming both
    with pytest.raises(hf_moeprune.PrunedConfigError, match="layer 0: per_layer_config gives num_local_experts=3"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["per_layer_config"]  # edited consistently: now only the weights disagree
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        hf_moeprune.PrunedConfigError,
        match=r"layer 0: config says experts_per_layer=5 but checkpoint tensor model.layers.0.mlp.\S+ has shape \[3, ",
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_autoconfig_resolves_pruned_type(tmp_path):
    model = tiny_model("gpt_oss")
    prune_experts(model, {0: [0, 1, 2], 2: [3, 4, 5, 6]})
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config).__name__ == "MoEPruneGptOssConfig"
    assert config.experts_per_layer == [3, 8, 4]


def test_loaded_checkpoint_pruned_then_saved_reloads_exactly(family, tmp_path):
    """A model that came from from_pretrained (with the checkpoint's key renamings) keeps its weights."""
    tiny_model(family).save_pretrained(tmp_path / "stock")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    prune_experts(model, _hetero_keep(model))
    expected = _logits(model)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert reloaded.config.model_type == f"moeprune_{family}"
    assert torch.equal(_logits(reloaded), expected)


def test_one_layout_reader_for_config_dicts_and_objects(tmp_path):
    from hf_moeprune.format.layout import (
        base_model_type,
        expert_layout,
        pruned_layout,
        pruning_fields,
        saved_kept_expert_ids,
    )

    uniform, ragged = tiny_model("mixtral"), tiny_model("mixtral")
    prune_experts(uniform, {0: [1, 3, 5, 7], 1: [0, 2, 4, 6], 2: [0, 1, 2, 3]})
    prune_experts(ragged, {0: [1, 3, 5], 1: [0, 2, 4, 6], 2: [6, 7]})
    uniform.save_pretrained(tmp_path / "stock")  # stock export: the layout lies under moeprune_provenance
    ragged.save_pretrained(tmp_path / "pruned")
    for name, model, stock in (("stock", uniform, True), ("pruned", ragged, False)):
        as_dict = json.loads((tmp_path / name / "config.json").read_text())
        as_object = AutoConfig.from_pretrained(tmp_path / name)
        for config in (as_dict, as_object):
            layout = expert_layout(config)
            assert layout.stock_export is stock and layout.family == "mixtral" and base_model_type(config) == "mixtral"
            assert [list(ids) for ids in layout.kept_expert_ids] == model.config.kept_expert_ids
            assert layout.experts_per_layer == tuple(model.config.experts_per_layer)
            assert saved_kept_expert_ids(config) == model.config.kept_expert_ids
            assert pruning_fields(config).stock_export is stock and pruned_layout(config) == layout
    plain = tiny_model("mixtral").config
    assert pruning_fields(plain) is None and saved_kept_expert_ids(plain) is None and pruned_layout(plain) is None
    assert base_model_type(plain) == "mixtral"
    with pytest.raises(ValueError, match="not pruned by hf_moeprune"):
        expert_layout(plain.to_dict())
