"""Matmuls straight from the packed weights, instead of dequantizing every tensor on every forward.

Reading a quantized tensor (``module.weight``, ``experts.gate_up_proj``) during inference on CPU returns a
``PackedWeight`` instead of a dequantized copy. ``F.linear(x, packed)`` (what ``nn.Linear`` calls) and
hf_moeprune's experts runtime (``packed_experts.py``) then pick a kernel by the number of rows multiplied
(``choose_kernel``, a pure function; the kernels are a small registry, ``KERNELS``):

- few rows (decoding): torch's weight-only kernels on bf16 activations.
  int4: ``aten._weight_int4pack_mm_for_cpu`` on the stored codes, repacked once per tensor (per expert) by
  ``aten._convert_weight_to_int4pack_for_cpu``. The kernel computes ``(q - 8) * scale + zero`` per group of
  the input dimension; the int4 scheme's symmetric codes are ``q - 8`` with zero 0, so the weights it uses are
  exactly the stored ones (scales rounded to bf16).
  int8: ``aten._weight_int8pack_mm`` takes one scale per output channel, while the int8 scheme stores one per
  group of 128: the kernel copy is re-quantized per output channel from the dequantized weight once (one more
  int8 rounding, measured in the tests against the dequantized reference). Transposed expert tensors
  (GPT-OSS's ``[in, out]``, whose groups run along the output dimension) get that int8 copy too, for either
  scheme: the int4 kernel needs groups along the input dimension.
- many rows (prefill, large batches): one fp32 GEMM on a copy that lives only for that matmul. int8 (and
  transposed experts): the int8 kernel copy converted to fp32, scales applied to the output; int4: that expert
  dequantized from the stored nibbles (exactly the format's values). Both GEMV kernels cost about rows x their
  one-row time, so above ``GEMV_MAX_ROWS`` the GEMM wins (kernels table of
  ``benchmarks/results/quantized_inference.md``).

fbgemm's dynamic int8 linear (``quantized::linear_dynamic``) is several times faster than both on AVX2 but is not
used: it quantizes the activations too, per tensor to 7 bits. On the tiny test models that already multiplies the
error against the dequantized reference by 2-4 (error table of the benchmark results), and LLMs' outlier
features (a few hidden dimensions 100x larger than the rest) make per-tensor activation scales far worse; random
tiny models have no such outliers, so no test here could show it.

Indexing a 3D expert tensor (``gate_up_proj[expert]``) prepares only that expert, so only the experts that
received tokens are ever repacked or multiplied. Any other use of a ``PackedWeight`` (GPT-OSS's transposed
``x @ W[e]`` in its eager loop, a ``.float()``, grouped_mm) dequantizes just what is used and runs the op
unchanged, as before. The kernel copies live next to the stored codes (not in the state dict), so they add the
size of the packed weights once more in memory for the tensors that have been used.

Used only where it is exact to the format and differentiation is not needed: CPU tensors, grad disabled,
int4/int8, groups inside rows (int4 groups of 32/64/128/256 along the input dimension).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hf_moeprune import compat

logger = logging.getLogger(__name__)

INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# Rows (tokens routed to one expert, or tokens through one linear) up to which the packed GEMV kernels run; above
# it, one fp32 GEMM. Both GEMV kernels cost about rows x their one-row time, the GEMM pays a weight conversion
# once. Measured on one AVX2 core, torch 2.13 (kernels table of benchmarks/results/quantized_inference.md), at
# [4096, 1024]: int8pack 9.4 ms vs 20 ms for the int8 GEMM path at 16 rows, 36 vs 32 at 64; int4pack 29 ms vs
# 42 ms for dequantize + GEMM at 64 rows. Transposed experts use the int8 limit.
GEMV_MAX_ROWS = {"int8": 32, "int4": 64}
# torch's int4 CPU packing takes an inner-k-tiles argument that the CPU kernel does not use for its layout
# (torch 2.13); 2 is accepted for every K that is a multiple of the group size.
INNER_K_TILES = 2
_ENABLED = True


@contextlib.contextmanager
def packed_kernels(enabled: bool):
    """Turn the packed kernels on or off inside a block (e.g. to time or compare the dequantizing path)."""
    global _ENABLED
    before, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = before


_AVAILABLE = compat.packed_kernels_available()


def can_use_packed(scheme: str, group_size: int, shape: torch.Size, packed: tuple[torch.Tensor, ...]) -> bool:
    """Whether reads of this quantized tensor may return a ``PackedWeight`` right now."""
    if not (_ENABLED and _AVAILABLE) or torch.is_grad_enabled() or len(shape) not in (2, 3):
        return False
    if packed[0].device.type != "cpu":  # codes and scales always share a device
        return False
    in_features = shape[-1]
    if scheme == "int4":
        return group_size in INT4_KERNEL_GROUP_SIZES and in_features % group_size == 0
    if scheme == "int8":
        rows = shape[-1] * shape[-2]
        return in_features % group_size == 0 or (group_size % in_features == 0 and rows % group_size == 0)
    return False


class PackedWeight:
    """A quantized weight (or one expert of a 3D one) that ``F.linear`` multiplies with packed kernels.

    ``transposed`` marks one expert of a ``[experts, in, out]`` tensor (GPT-OSS): ``linear`` then computes
    ``x @ W`` instead of ``x @ W.T``.
    """

    def __init__(self, parametrization, packed: tuple[torch.Tensor, ...], expert: int | None = None,
                 transposed: bool = False):  # fmt: skip
        self.parametrization = parametrization
        self.packed = packed
        self.expert = expert
        self.transposed = transposed
        full = parametrization.shape
        self.shape = torch.Size(full[1:] if expert is not None else full)
        self.out_features = self.shape[-1] if transposed else self.shape[-2]
        self.dtype = parametrization.dtype
        self.device = packed[0].device
        self.kernel = None  # the GEMV kernel's copy of the weight, built on first use
        self.experts: dict[tuple[int, bool], PackedWeight] = {}  # one handle per expert used, reused across forwards

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.shape[0]

    def expert_handle(self, index: int, transposed: bool = False) -> PackedWeight:
        """The handle of expert ``index`` (kept, with its kernel copy, for the next forwards)."""
        handle = self.experts.get((index, transposed))
        if handle is None:
            handle = PackedWeight(self.parametrization, self.packed, index, transposed)
            self.experts[(index, transposed)] = handle
        return handle

    def __getitem__(self, index):
        if self.expert is None and len(self.shape) == 3:
            if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
                index = int(index)
            if isinstance(index, int):
                return self.expert_handle(index % self.shape[0])
        return self.dequantize()[index]

    def dequantize(self) -> torch.Tensor:
        if self.expert is None:
            return self.parametrization.dequantize_packed(self.packed)
        return self.parametrization.dequantize_expert(self.packed, self.expert)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        kernel = KERNELS[choose_kernel(self.parametrization.scheme, flat.shape[0], self.transposed)]
        out = kernel(self, flat).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out + bias if bias is not None else out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            usable = isinstance(weight, PackedWeight) and weight.ndim == 2 and not weight.transposed
            if usable and isinstance(x, torch.Tensor):
                return weight.linear(x, bias)
        return func(*_materialize(args), **_materialize(kwargs))

    def __repr__(self) -> str:
        where = f", expert={self.expert}" if self.expert is not None else ""
        return f"PackedWeight({self.parametrization.scheme}, shape={tuple(self.shape)}{where})"

    # Python operators used on weights by modeling code (e.g. ``x @ W[e]``) go through torch functions too.
    def __matmul__(self, other):
        return self.dequantize() @ _materialize(other)

    def __rmatmul__(self, other):
        return _materialize(other) @ self.dequantize()

    def __getattr__(self, name: str) -> Any:
        # any tensor attribute or method (t(), float(), to(), ...): act on the dequantized tensor; only reached
        # for names the instance does not have, so a missing own attribute must not recurse into dequantize
        if name.startswith("__") or name in _OWN_ATTRIBUTES:
            raise AttributeError(name)
        return getattr(self.dequantize(), name)


_OWN_ATTRIBUTES = frozenset(
    {"parametrization", "packed", "expert", "transposed", "shape", "out_features", "dtype", "device", "kernel",
     "experts"}
)  # fmt: skip


# -- kernels: (weight, rows [n, in]) -> [n, out]; chosen per call by choose_kernel --------------------------------
def _kernel_copy(weight: PackedWeight):
    if weight.kernel is None:
        weight.kernel = weight.parametrization.kernel_weights(weight.packed, weight.expert, weight.transposed)
    return weight.kernel


def _int8pack(weight: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    codes, scales = _kernel_copy(weight)
    return compat.int8pack_mm(rows.to(torch.bfloat16), codes, scales)


def _int4pack(weight: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    packed, scales_and_zeros = _kernel_copy(weight)
    return compat.int4pack_mm(rows.to(torch.bfloat16), packed, weight.parametrization.group_size, scales_and_zeros)


def _int8_gemm(weight: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    # the int8 kernel copy in the rows' dtype, one GEMM, the per-channel scales applied to the output: the same
    # weights as int8pack (so results do not depend on the row count beyond bf16 rounding), and one int8->fp32
    # conversion instead of the scheme's per-group dequantization (several times slower per expert on CPU)
    codes, scales = _kernel_copy(weight)
    return F.linear(rows, codes.to(rows.dtype)) * scales.to(rows.dtype)


def _dequantized_gemm(weight: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    nibbles, scale = expert_rows(weight.packed, weight.parametrization.shape, weight.parametrization.group_size,
                                 weight.expert)  # fmt: skip
    dense = int4_dequantize(nibbles, scale, weight.shape, weight.parametrization.group_size).to(rows.dtype)
    return F.linear(rows, dense)


KERNELS: dict[str, Callable[[PackedWeight, torch.Tensor], torch.Tensor]] = {
    "int8pack": _int8pack,
    "int4pack": _int4pack,
    "int8_gemm": _int8_gemm,
    "dequantize": _dequantized_gemm,
}
# (few rows, many rows) per scheme for [out, in] weights; transposed experts use the int8 copy for either scheme
# (see the module docstring)
KERNELS_BY_SCHEME = {"int8": ("int8pack", "int8_gemm"), "int4": ("int4pack", "dequantize")}


def choose_kernel(scheme: str, rows: int, transposed: bool = False) -> str:
    """The kernel (a key of ``KERNELS``) for multiplying ``rows`` rows by one packed weight of ``scheme``."""
    scheme = "int8" if transposed else scheme
    few, many = KERNELS_BY_SCHEME[scheme]
    return few if rows <= GEMV_MAX_ROWS[scheme] else many


def _materialize(value):
    if isinstance(value, PackedWeight):
        return value.dequantize()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    return value


# -- kernel-side copies of the packed data (pure functions of the stored tensors) ----------------------


def expert_rows(packed: tuple[torch.Tensor, ...], shape: torch.Size, group_size: int, expert: int | None):
    """The stored (codes-or-nibbles, scales) rows of one expert (or the whole 2D tensor): groups never cross
    rows here (checked by ``can_use_packed``), so one expert is a contiguous block of groups."""
    codes, scale = packed[0], packed[1]
    if expert is None:
        return codes, scale
    per_expert = shape[1] * shape[2] // group_size  # groups per expert (whole rows, or whole groups of rows)
    return codes[expert * per_expert : (expert + 1) * per_expert], scale[
        expert * per_expert : (expert + 1) * per_expert
    ]


def int4_kernel_weights(
    nibbles: torch.Tensor, scale: torch.Tensor, out_features: int, in_features: int, group_size: int
):
    from hf_moeprune.quantization.schemes import unpack_int4

    codes = unpack_int4(nibbles).reshape(out_features, in_features)
    q = (codes.to(torch.int32) + 8).contiguous()
    weight = compat.convert_weight_to_int4pack(q, INNER_K_TILES)
    scales = scale.reshape(out_features, in_features // group_size).t().to(torch.bfloat16)
    scales_and_zeros = torch.stack((scales, torch.zeros_like(scales)), dim=-1).contiguous()
    return weight, scales_and_zeros


def int4_dequantize(nibbles: torch.Tensor, scale: torch.Tensor, shape: torch.Size, group_size: int) -> torch.Tensor:
    """float32 values of int4 ``nibbles`` (groups inside rows): the scheme's dequantization, exactly, written
    straight into one float buffer (the scheme's general version, which pads and stacks, is ~5x slower)."""
    values = torch.empty(nibbles.numel() * 2, dtype=torch.float32)
    pairs, flat = values.view(-1, 2), nibbles.reshape(-1)
    pairs[:, 0] = flat & 0x0F
    pairs[:, 1] = flat >> 4
    return values.view(-1, group_size).sub_(8).mul_(scale).view(shape)


def int8_kernel_weights(dense: torch.Tensor):
    """Per-output-channel symmetric int8 of a [out, in] weight (the kernel's layout)."""
    absmax = dense.float().abs().amax(dim=1)
    scale = absmax / 127
    codes = torch.round(dense.float() / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return codes.to(torch.int8).contiguous(), scale.to(torch.bfloat16)
