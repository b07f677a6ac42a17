"""hf_moeprune's runtime for quantized experts on CPU (quantization/packed_experts.py + packed_kernels.py)."""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_moeprune
from hf_moeprune import compat, prune_experts
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.inference import set_experts_implementation
from hf_moeprune.quantization import PACKED_EXPERTS, quantize

# the module, not the ``packed_kernels`` context manager that hf_moeprune.quantization exports under its name
pk = importlib.import_module("hf_moeprune.quantization.packed_kernels")

IDS = torch.randint(3, 99, (2, 11), generator=torch.Generator().manual_seed(3))
# widths that fit the kernels' groups (real models: 2048..7168); top-2 of 8 experts everywhere
SHAPES = {
    "mixtral": dict(hidden_size=64, intermediate_size=128, head_dim=16),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=128, head_dim=16),
    "gpt_oss": dict(hidden_size=64, intermediate_size=128, head_dim=16),  # [in, out] experts with biases
    "deepseek_v3": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=128, num_experts_per_tok=2),
}
GEMV = {"int8pack", "int4pack"}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _quantized(family, scheme, group_size=32):
    return quantize(tiny_model(family, **SHAPES[family]), scheme, group_size=group_size)


def _reference(model, ids=IDS):
    with pk.packed_kernels(False):  # every weight dequantized, the class's eager loop: the format's own values
        return _logits(model, ids)


def _close(out, reference, scheme):
    cosine = torch.nn.functional.cosine_similarity(out.flatten().double(), reference.flatten().double(), 0).item()
    error = ((out - reference).norm() / reference.norm()).item()
    # the tolerance of the packed kernels since they were added (bf16 activations; int8's per-channel copy)
    assert cosine > (0.9999 if scheme == "int4" else 0.9995) and error < (0.02 if scheme == "int4" else 0.04), (
        cosine,
        error,
    )


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every kernel call as (kernel, expert or None, rows), and the torch ops it reached."""
    calls, ops = [], []
    for name, kernel in list(pk.KERNELS.items()):

        def spy(weight, rows, name=name, kernel=kernel):
            calls.append((name, weight.expert, rows.shape[0]))
            return kernel(weight, rows)

        monkeypatch.setitem(pk.KERNELS, name, spy)
    for op in ("int8pack_mm", "int4pack_mm"):
        original = getattr(compat, op)
        monkeypatch.setattr(compat, op, lambda *a, op=op, original=original: ops.append(op) or original(*a))
    return calls, ops


def _routing(model):
    """Per MoE layer, the expert ids each experts module received in the next forward."""
    seen = []
    handles = [
        experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].reshape(-1).tolist()))
        for experts in (m for m in model.modules() if type(m).__name__.endswith("Experts"))
    ]
    return seen, handles


@pytest.mark.parametrize("family, scheme", [
    ("mixtral", "int8"), ("mixtral", "int4"), ("qwen3_moe", "int4"), ("gpt_oss", "int8"), ("gpt_oss", "int4"),
    ("deepseek_v3", "int8"),
])  # fmt: skip
def test_runtime_matches_the_dequantized_reference_and_touches_only_hit_experts(family, scheme, kernel_calls):
    calls, ops = kernel_calls
    model = _quantized(family, scheme)
    assert compat.experts_implementation(model.config) == PACKED_EXPERTS
    # decoding one token: each MoE layer multiplies exactly the experts the router chose, two matmuls each, on
    # the GEMV kernel (GPT-OSS's transposed experts and every int8 tensor on int8pack, other int4 on int4pack)
    seen, handles = _routing(model)
    one = IDS[:1, :1]
    out = _logits(model, one)
    for handle in handles:
        handle.remove()
    expert_calls = [c for c in calls if c[1] is not None]
    assert sorted(c[1] for c in expert_calls) == sorted(e for layer in seen for e in layer for _ in range(2))
    assert {c[0] for c in calls} <= GEMV and all(c[2] == 1 for c in calls)
    expected_expert_op = "int4pack_mm" if scheme == "int4" and family != "gpt_oss" else "int8pack_mm"
    assert ops.count(expected_expert_op) >= len(expert_calls) and len(ops) == len(calls)
    # kernel copies were made for those experts only, and are not in the state dict
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert len(experts) == len(seen)
    for module, hit in zip(experts, seen):
        for name in ("gate_up_proj", "down_proj"):
            handle = module.parametrizations[name][0].__dict__["_packed_handle"]
            assert sorted(e for e, _ in handle.experts) == sorted(set(hit)) and len(set(hit)) < handle.shape[0]
            assert all(h.kernel is not None for h in handle.experts.values())
    assert not any("kernel" in k for k in model.state_dict())
    calls.clear()
    _close(out, _reference(model, one), scheme)
    assert not calls  # the reference ran no kernel
    # a prompt of two sequences (attention on the dequantize path, experts on a few rows each)
    _close(_logits(model), _reference(model), scheme)


def test_kernel_is_chosen_by_rows(kernel_calls, monkeypatch):
    calls, ops = kernel_calls
    int8, int4 = pk.GEMV_MAX_ROWS["int8"], pk.GEMV_MAX_ROWS["int4"]
    assert pk.choose_kernel("int4", int4) == "int4pack" and pk.choose_kernel("int8", int8) == "int8pack"
    assert pk.choose_kernel("int4", 1, transposed=True) == "int8pack"
    assert pk.choose_kernel("int4", int4 + 1) == "dequantize"
    assert pk.choose_kernel("int8", int8 + 1) == pk.choose_kernel("int4", int8 + 1, transposed=True) == "int8_gemm"
    model = _quantized("mixtral", "int4")
    reference = _reference(model)
    # every matmul above the GEMV limit (as in a long prefill): int4 dequantized + fp32 GEMM
    monkeypatch.setitem(pk.GEMV_MAX_ROWS, "int4", 0)
    out = _logits(model)
    assert calls and {c[0] for c in calls} == {"dequantize"} and not ops
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)  # exactly the format's values, fp32 matmul
    # and the GEMV kernels for all of it when the limit is above every row count
    calls.clear()
    monkeypatch.setitem(pk.GEMV_MAX_ROWS, "int4", 10_000)
    _close(_logits(model), reference, "int4")
    assert {c[0] for c in calls} == {"int4pack"} and ops.count("int4pack_mm") == len(calls)
    # int8, many rows: fp32 GEMM on the int8 kernel copy
    model = _quantized("qwen3_moe", "int8", group_size=128)
    calls.clear(), ops.clear()
    monkeypatch.setitem(pk.GEMV_MAX_ROWS, "int8", 0)
    _close(_logits(model), _reference(model), "int8")
    assert {c[0] for c in calls} == {"int8_gemm"} and not ops


def test_int4_dequantize_is_the_schemes_exactly():
    from hf_moeprune.quantization import get_scheme

    weight = torch.randn(6, 256)
    nibbles, scale = get_scheme("int4").quantize(weight, 64)
    expected = get_scheme("int4").dequantize((nibbles, scale), weight.shape, torch.float32, 64)
    assert torch.equal(pk.int4_dequantize(nibbles, scale, weight.shape, 64), expected)


def test_fallbacks_run_the_eager_loop(kernel_calls, monkeypatch):
    calls, _ = kernel_calls
    model = _quantized("qwen3_moe", "int8")
    reference = _reference(model)
    with torch.enable_grad():  # training / distillation through the model: differentiable, no kernels
        logits = model(IDS).logits
        logits.sum().backward()
    assert not calls and torch.equal(logits.detach(), reference)
    assert model.model.embed_tokens.weight.grad is not None
    monkeypatch.setattr(pk, "_AVAILABLE", False)  # a torch build without the packed ops
    assert torch.equal(_logits(model), reference) and not calls


def test_reloaded_and_pruned_models_keep_the_runtime(tmp_path):
    model = _quantized("mixtral", "int8")
    before = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert compat.experts_implementation(reloaded.config) == PACKED_EXPERTS
    assert torch.equal(_logits(reloaded), before)
    assert set_experts_implementation(reloaded, "auto") == PACKED_EXPERTS  # generate's default keeps it
    # experts removed after the kernel copies were built: the copies of the old experts are dropped, the
    # kept experts match the dequantized reference
    layers = hf_moeprune.get_adapter(reloaded).moe_layer_indices(reloaded)
    prune_experts(reloaded, {layer: [6, 1, 3, 0] for layer in layers})
    _close(_logits(reloaded), _reference(reloaded), "int8")
