"""Families whose router does not return (logits, top-k weights, top-k indices) or whose experts module is not called
as experts(hidden, top_k_index, top_k_weights) (Llama 4: scores scattered over all experts, experts run densely on
score-scaled inputs): the statistics, soft masking, surgery and the selection bias work on them through the declared
conventions (adapters.base.EXPERTS_CALLS, format.modeling_moeprune.ROUTER_OUTPUTS)."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import run_without_package
from transformers import AutoModelForCausalLM

import hf_moeprune
from hf_moeprune import prune_experts
from hf_moeprune.adapters import ADAPTERS
from hf_moeprune.adapters.base import EXPERTS_CALLS
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.format import enable_selection_bias
from hf_moeprune.format.modeling_moeprune import DEFAULT_ROUTER_OUTPUT, ROUTER_OUTPUTS
from hf_moeprune.observation import EXPERTS_FORWARD_WRAPPERS, RoutingInstrumentation, new_statistics, observe_routing
from hf_moeprune.oneshot import EVERY_EXPERT_OUTPUTS, ExpertOutputObserver

CONVENTION_FAMILIES = sorted(
    name
    for name, adapter in ADAPTERS.items()
    if adapter.tiny_config and (adapter.router_output != DEFAULT_ROUTER_OUTPUT or adapter.experts_call != "routed")
)
IDS = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _choices(model, adapter):
    """Hooks recording each MoE layer's chosen indices, read through the family's router output convention."""
    chosen, handles = {}, []
    for i in adapter.moe_layer_indices(model):
        router = adapter.router(adapter.decoder_layers(model)[i])

        def hook(module, args, output, i=i):
            chosen[i] = adapter.unpack_router_output(module, output)[2]

        handles.append(router.register_forward_hook(hook))
    return chosen, handles


def test_every_convention_has_a_family_and_a_wrapper():
    assert CONVENTION_FAMILIES == ["llama4", "llama4_text"]
    assert set(EXPERTS_FORWARD_WRAPPERS) == set(EVERY_EXPERT_OUTPUTS) == set(EXPERTS_CALLS)
    used = {ADAPTERS[name].router_output for name in ADAPTERS} | {DEFAULT_ROUTER_OUTPUT}
    assert used == set(ROUTER_OUTPUTS)
    with pytest.raises(ValueError, match="router_output='logits' for 'x'"):
        hf_moeprune.MoEAdapter(model_type="x", router_output="logits")
    with pytest.raises(ValueError, match="experts_call='dense' for 'x'"):
        hf_moeprune.MoEAdapter(model_type="x", experts_call="dense")


@pytest.mark.parametrize("family", CONVENTION_FAMILIES)
def test_reap_reads_each_routed_pairs_own_expert_output(family):
    """The observer sees, per routed (token, expert) pair, the expert's output on the token computed by hand from the
    transposed [experts, in, out] tensors; REAP sums score x ||output||; the model's logits do not change."""
    model = tiny_model(family).eval()
    adapter = hf_moeprune.get_adapter(model)
    expected = _logits(model)
    seen, outputs = {}, []

    def observer(layer, experts, hidden, index, per_pair, token_weights):
        seen[layer] = (hidden.clone(), index.clone(), per_pair.clone())

    every = ExpertOutputObserver()  # every expert on every token (HC-SMoE merging), through the dense call
    stats = observe_routing(
        model, [{"input_ids": IDS}], observers=[observer, every], on_output=lambda b, o: outputs.append(o.logits),
        progress=False,
    )  # fmt: skip
    assert torch.equal(outputs[0], expected)
    snapshot = stats.snapshot()
    assert sorted(seen) == adapter.moe_layer_indices(model)
    for layer, (hidden, index, per_pair) in seen.items():
        decoder_layer = adapter.decoder_layers(model)[layer]
        experts, router = adapter.experts(decoder_layer), adapter.router(decoder_layer)
        with torch.no_grad():
            _, weights, chosen = adapter.unpack_router_output(router, router(hidden))
            manual = []
            for token, expert in zip(torch.arange(IDS.numel()).repeat_interleave(index.shape[1]), index.reshape(-1)):
                gate, up = (hidden[token] @ experts.gate_up_proj[expert]).chunk(2, dim=-1)
                manual.append((up * F.silu(gate)) @ experts.down_proj[expert])
        assert torch.equal(chosen, index)
        with torch.no_grad():
            gate, up = torch.einsum("th,ehi->eti", hidden, experts.gate_up_proj).chunk(2, dim=-1)
            every_expert = torch.einsum("eti,eih->eth", up * F.silu(gate), experts.down_proj).sum(1)
        torch.testing.assert_close(every.values["output_sum"][layer], every_expert, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_pair, torch.stack(manual), rtol=1e-5, atol=1e-6)
        norms = torch.stack(manual).norm(dim=-1)
        num_experts = adapter.num_experts(decoder_layer)
        reap = torch.bincount(index.reshape(-1), weights=(weights.reshape(-1) * norms).double(), minlength=num_experts)
        torch.testing.assert_close(snapshot[layer].reap_sum.double(), reap, rtol=1e-5, atol=1e-6)
        counts = torch.bincount(index.reshape(-1), minlength=num_experts).float()
        assert torch.equal(snapshot[layer].tokens.float(), counts) and counts.sum() == IDS.numel() * 2


@pytest.mark.parametrize("family", CONVENTION_FAMILIES)
def test_training_forward_with_the_observer_is_the_stock_forward(family):
    """In training mode (the trainer's observer, REAP recorded) the logits and the gradients equal the stock ones."""
    torch.manual_seed(0)
    model = tiny_model(family).train()
    adapter = hf_moeprune.get_adapter(model)
    stock = model(IDS).logits
    stock.sum().backward()
    stock_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    inst = RoutingInstrumentation(model, adapter, new_statistics(model, adapter))
    inst.attach()
    inst.recording = True
    observed = model(IDS).logits
    observed.sum().backward()
    inst.detach()
    assert torch.equal(observed, stock)
    assert all(torch.equal(p.grad, stock_grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    inst.statistics.end_step()
    assert all(s.reap_sum.sum() > 0 for s in inst.statistics.snapshot().values())


@pytest.mark.parametrize("family", CONVENTION_FAMILIES)
def test_soft_masked_experts_are_never_chosen_and_removing_them_keeps_the_logits(family):
    """Soft masking (before removal) re-routes in the router's own output form; removing the masked experts then
    changes nothing (per-expert sigmoid weights, no renormalisation), and the router's out_features follow."""
    model = tiny_model(family).eval()
    adapter = hf_moeprune.get_adapter(model)
    moe = adapter.moe_layer_indices(model)
    masked = {layer: [1, 6] if n % 2 else [0, 3, 5] for n, layer in enumerate(moe)}
    inst = RoutingInstrumentation(model, adapter, new_statistics(model, adapter), record_reap=False)
    inst.attach()
    for layer, ids in masked.items():
        inst.masked[layer] = torch.zeros(8, dtype=torch.bool).index_fill(0, torch.tensor(ids), True)
    chosen, handles = _choices(model, adapter)  # registered after the instrumentation's hooks: sees the re-routing
    soft = _logits(model)
    for handle in handles:
        handle.remove()
    inst.detach()
    assert not torch.equal(soft, _logits(model))  # the unmasked model chooses some of those experts
    for layer, ids in masked.items():
        assert not torch.isin(chosen[layer], torch.tensor(ids)).any()
    prune_experts(model, {layer: [e for e in range(8) if e not in ids] for layer, ids in masked.items()})
    for layer, ids in masked.items():
        router = adapter.router(adapter.decoder_layers(model)[layer])
        assert router.out_features == router.weight.shape[0] == router.num_experts == 8 - len(ids)
    torch.testing.assert_close(_logits(model), soft, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", CONVENTION_FAMILIES)
def test_selection_bias_saves_and_reloads_with_and_without_the_package(family, tmp_path):
    """Zero bias changes nothing; a large entry forces its expert; after surgery the pruned checkpoint (per-layer
    counts) reproduces the biased logits with hf_moeprune and under trust_remote_code without it."""
    model = tiny_model(family).eval()
    adapter = hf_moeprune.get_adapter(model)
    moe = adapter.moe_layer_indices(model)
    expected = _logits(model)
    enable_selection_bias(model, adapter)
    assert torch.equal(_logits(model), expected)
    with torch.no_grad():
        adapter.router(adapter.decoder_layers(model)[moe[0]]).selection_bias[5] = 100.0
    chosen, handles = _choices(model, adapter)
    biased = _logits(model)
    for handle in handles:
        handle.remove()
    assert not torch.equal(biased, expected) and (chosen[moe[0]] == 5).any(dim=-1).all()
    prune_experts(model, {moe[0]: [5, 0, 1, 2, 3, 4], moe[1]: [7, 6, 5, 4, 3, 2, 1]})
    biased = _logits(model)
    model.save_pretrained(tmp_path, export_stock=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["selection_bias_router_output"] == ADAPTERS[family].router_output
    assert [c for c in config["experts_per_layer"] if c is not None] == [6, 7]
    auto_class = ADAPTERS[family].auto_class
    assert torch.equal(_logits(getattr(transformers, auto_class).from_pretrained(tmp_path)), biased)
    torch.save(IDS, tmp_path / "ids.pt")
    torch.save(biased, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import torch
        import transformers
        m = getattr(transformers, {auto_class!r}).from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        with torch.no_grad():
            out = m(torch.load({str(tmp_path / "ids.pt")!r})).logits
        print("REMOTE_OK" if torch.equal(out, torch.load({str(tmp_path / "expected.pt")!r})) else "REMOTE_DIFF")
        """
    )
    result = run_without_package(code, cwd=tmp_path)
    assert "REMOTE_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_transposed_dense_experts_quantize_save_and_reload(scheme, tmp_path):
    """The [experts, in, out] tensors quantize (layout-blind flat groups, dequantized when the dense experts read
    them), follow surgery, and reload bit for bit; compressed-tensors refuses the fused 3D experts with its reason."""
    from hf_moeprune.quantization import quantize, quantized_targets
    from hf_moeprune.quantization.compressed_tensors_export import (
        CompressedTensorsExportConfig,
        UnsupportedLayoutError,
        export_compressed_tensors,
    )

    model = tiny_model("llama4_text").eval()
    full = _logits(model)
    with pytest.raises(UnsupportedLayoutError, match="fused 3D tensors"):
        export_compressed_tensors(model, tmp_path / "ct", CompressedTensorsExportConfig(scheme="int4"))
    quantize(model, scheme, group_size=32)
    experts = {n for n in quantized_targets(model) if ".feed_forward.experts." in n}
    assert experts == {
        f"model.layers.{i}.feed_forward.experts.{t}" for i in (0, 2) for t in ("gate_up_proj", "down_proj")
    }
    prune_experts(model, {0: [7, 6, 5, 4, 3, 2], 2: [0, 1, 2, 3, 4, 5, 6]})
    quantized = _logits(model)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(reloaded), quantized)
    pruned_full = tiny_model("llama4_text").eval()
    prune_experts(pruned_full, {0: [7, 6, 5, 4, 3, 2], 2: [0, 1, 2, 3, 4, 5, 6]})
    cosine = F.cosine_similarity(quantized.flatten(), _logits(pruned_full).flatten(), dim=0)
    assert cosine > (0.999 if scheme == "int8" else 0.98) and not torch.equal(quantized, _logits(pruned_full))
    assert not torch.equal(full, _logits(pruned_full))
