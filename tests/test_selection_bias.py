"""The learned router selection bias (aux-loss-free balancing) is part of the model: it routes, follows
surgery, and is saved and reloaded (with hf_moeprune and with trust_remote_code alone)."""

import json
import textwrap

import pytest
import torch
from conftest import FAMILIES, RoutingRecorder, run_without_package
from transformers import AutoModelForCausalLM

import hf_moeprune
from hf_moeprune import permute_experts, prune_experts
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.format import enable_selection_bias

IDS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(5))
BIASED_FAMILIES = [f for f in FAMILIES if not hf_moeprune.get_adapter(tiny_model(f).config).has_native_selection_bias]


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _biased(family):
    """A tiny model whose routers strongly prefer expert 3 through the selection bias alone."""
    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    enable_selection_bias(model, adapter)
    for idx in adapter.moe_layer_indices(model):
        bias = adapter.router(adapter.decoder_layers(model)[idx]).selection_bias
        bias.copy_(torch.linspace(-0.5, 0.5, bias.numel()))
        bias[3] = 1e3
    return model, adapter


def test_native_bias_families_keep_their_bias_and_others_get_a_buffer():
    """Exactly the families whose routers carry DeepSeek-V3's ``e_score_correction_bias`` keep it."""
    native = set()
    for family in FAMILIES:
        model = tiny_model(family)
        adapter = hf_moeprune.get_adapter(model)
        routers = [adapter.router(adapter.decoder_layers(model)[i]) for i in adapter.moe_layer_indices(model)]
        assert routers, family
        if all(hasattr(router, "e_score_correction_bias") for router in routers):
            native.add(family)
        else:
            assert not any(hasattr(router, "e_score_correction_bias") for router in routers), family
    assert {"deepseek_v3", "glm4_moe", "dots1"} <= native
    assert sorted(set(FAMILIES) - native) == BIASED_FAMILIES


@pytest.mark.parametrize("family", BIASED_FAMILIES)
def test_zero_bias_changes_nothing_and_a_bias_changes_choice_not_weights(family):
    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    expected = _logits(model)
    recorder = RoutingRecorder(model)
    _logits(model)
    stock = dict(recorder.calls)
    recorder.close()
    enable_selection_bias(model, adapter)
    assert torch.equal(_logits(model), expected)  # zeros: routing identical, bit for bit
    layer0 = adapter.moe_layer_indices(model)[0]
    bias = adapter.router(adapter.decoder_layers(model)[layer0]).selection_bias
    bias[3] = 1e3
    recorder = RoutingRecorder(model)  # registered after the bias hook: sees the routing the experts get
    _logits(model)
    logits, weights, indices = recorder.calls[layer0]
    recorder.close()
    assert torch.equal(logits, stock[layer0][0])  # same router logits: the bias is not in the scores ...
    assert bool((indices == 3).any(dim=-1).all())  # ... but every token now chooses expert 3
    reference_weights, reference_indices = adapter.route(adapter.router(adapter.decoder_layers(model)[layer0]),
                                                         logits, bias)  # fmt: skip
    assert torch.equal(indices, reference_indices) and torch.equal(weights, reference_weights)
    assert not torch.equal(_logits(model), expected)


@pytest.mark.parametrize("family", BIASED_FAMILIES)
def test_bias_is_saved_and_reloaded(family, tmp_path):
    model, adapter = _biased(family)
    expected = _logits(model)
    model.save_pretrained(tmp_path)  # uniform counts, export_stock=True by default: still the pruned format
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"moeprune_{family}"
    assert config["selection_bias_router"] == adapter.router_path
    assert config["selection_bias_routing"] == adapter.routing
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for idx in adapter.moe_layer_indices(model):
        saved = adapter.router(adapter.decoder_layers(model)[idx]).selection_bias
        loaded = adapter.router(adapter.decoder_layers(reloaded)[idx]).selection_bias
        assert torch.equal(saved, loaded)
    assert torch.equal(_logits(reloaded), expected)


def test_bias_follows_pruning_and_permutation(tmp_path):
    model, adapter = _biased("mixtral")
    before = {i: adapter.router(layer).selection_bias.clone() for i, layer in enumerate(model.model.layers)}
    prune_experts(model, {0: [7, 3, 1, 0], 1: [3, 4, 5, 6, 2, 1]})
    permute_experts(model, {2: [7, 6, 5, 4, 3, 2, 1, 0]})
    layers = model.model.layers
    assert torch.equal(layers[0].mlp.gate.selection_bias, before[0][[7, 3, 1, 0]])
    assert torch.equal(layers[1].mlp.gate.selection_bias, before[1][[3, 4, 5, 6, 2, 1]])
    assert torch.equal(layers[2].mlp.gate.selection_bias, before[2].flip(0))
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.experts_per_layer == [4, 6, 8]
    assert torch.equal(reloaded.model.layers[1].mlp.gate.selection_bias, layers[1].mlp.gate.selection_bias)
    assert torch.equal(_logits(reloaded), expected)


def test_biased_model_loads_with_trust_remote_code_without_package(tmp_path):
    model, _ = _biased("qwen3_moe")
    prune_experts(model, {0: [3, 0, 1, 2, 4, 5], 2: [3, 1]})
    torch.save(IDS, tmp_path / "ids.pt")
    torch.save(_logits(model), tmp_path / "expected.pt")
    # the same model with its bias zeroed: the remote load must not match this one
    zeroed = tiny_model("qwen3_moe")
    prune_experts(zeroed, {0: [3, 0, 1, 2, 4, 5], 2: [3, 1]})
    torch.save(_logits(zeroed), tmp_path / "unbiased.pt")
    model.save_pretrained(tmp_path / "model")
    code = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        assert float(m.model.layers[1].mlp.gate.selection_bias[3]) == 1e3
        with torch.no_grad():
            out = m(torch.load({str(tmp_path / "ids.pt")!r})).logits
        assert torch.equal(out, torch.load({str(tmp_path / "expected.pt")!r}))
        assert not torch.allclose(out, torch.load({str(tmp_path / "unbiased.pt")!r}))
        print("REMOTE_OK")
        """
    )
    result = run_without_package(code, cwd=tmp_path)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


def test_unknown_routing_rule_in_config_fails_at_load(tmp_path):
    model, _ = _biased("mixtral")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["selection_bias_routing"] = "coin_flip"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="selection_bias_routing='coin_flip' is not one of"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
