"""hf_moeprune's runtime for quantized experts: an experts implementation of transformers' ``ExpertsInterface``.

``quantize`` (and ``from_pretrained`` of a quantized checkpoint) selects it on CPU-only machines with
``model.set_experts_implementation("hf_moeprune_packed")``. Per MoE layer and forward it

- sorts the (token, expert) pairs by expert once and reads the per-expert counts with one host sync,
- visits only the experts that received tokens, in order, on contiguous slices of the sorted tokens,
- multiplies each with ``PackedWeight.linear``, which picks the kernel by that expert's row count
  (``packed_kernels.choose_kernel``: packed GEMV kernels for few rows, dequantize + fp32 GEMM for many) and
  keeps each expert's kernel copy from its first use on, so nothing is repacked per forward,
- reads the packed tensors straight from the parametrization, not through ``module.<name>`` (which would run
  torch's parametrization machinery and a handle lookup per projection and expert).

It follows the layout flags transformers' ``use_experts_implementation`` sets on every experts class:
``has_gate`` (gate_up_proj + ``_apply_gate``, which also handles interleaved ``is_concatenated=False``
layouts such as GPT-OSS's), ``has_bias``, ``is_transposed`` (``[experts, in, out]``), ``has_post_expert_norm``,
and drops expert-parallel sentinels (ids >= num_experts, weight 0) as grouped_mm does.

Wherever the kernels do not apply (grad enabled, a projection that is not hf_moeprune-quantized, nf4, other
devices, layouts whose groups straddle rows), it runs the class's own eager loop, which dequantizes what it
reads: the behaviour of the eager setting this runtime replaces.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from hf_moeprune import compat
from hf_moeprune.quantization.packed_kernels import PackedWeight, can_use_packed

logger = logging.getLogger(__name__)

PACKED_EXPERTS = "hf_moeprune_packed"


def _packed_projection(experts: nn.Module, name: str) -> PackedWeight | None:
    """The ``PackedWeight`` of ``experts.<name>`` when the packed kernels apply to it right now, else None."""
    if not parametrize.is_parametrized(experts, name):
        return None
    chain = experts.parametrizations[name]
    if len(chain) != 1 or not hasattr(chain[0], "packed_handle"):  # one hf_moeprune QuantizedWeight, nothing else
        return None
    weight = chain[0]
    packed = tuple(getattr(chain, f"original{i}") for i in range(chain.ntensors))
    if not can_use_packed(weight.scheme, weight.group_size, weight.shape, packed) or len(weight.shape) != 3:
        return None
    return weight.packed_handle(packed)


def packed_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    up = _packed_projection(self, "gate_up_proj" if self.has_gate else "up_proj")
    down = _packed_projection(self, "down_proj") if up is not None else None
    if down is None or hidden_states.device.type != "cpu":
        return compat.experts_eager_forward(type(self))(self, hidden_states, top_k_index, top_k_weights)
    num_experts, transposed = up.shape[0], self.is_transposed
    up_bias = down_bias = None
    if self.has_bias:
        up_bias = self.gate_up_proj_bias if self.has_gate else self.up_proj_bias
        down_bias = self.down_proj_bias

    num_top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts).tolist()  # the one host sync per layer
    tokens = order // num_top_k
    rows = hidden_states.index_select(0, tokens)
    outputs = []
    start = 0
    for expert, count in enumerate(counts[:num_experts]):  # ids >= num_experts: expert-parallel sentinels, last
        if not count:
            continue
        x = rows[start : start + count]
        h = up.expert_handle(expert, transposed).linear(x, None if up_bias is None else up_bias[expert])
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = down.expert_handle(expert, transposed).linear(h, None if down_bias is None else down_bias[expert])
        outputs.append(h)
        start += count
    final = torch.zeros_like(hidden_states)
    if not outputs:
        return final
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    weights = top_k_weights.reshape(-1).index_select(0, order[:start])
    out = out * weights.unsqueeze(-1).to(out.dtype)
    return final.index_add_(0, tokens[:start], out.to(hidden_states.dtype))


def register_packed_experts() -> None:
    """Make ``PACKED_EXPERTS`` a name transformers' ``set_experts_implementation`` accepts (idempotent)."""
    compat.experts_functions().register(PACKED_EXPERTS, packed_experts_forward)
