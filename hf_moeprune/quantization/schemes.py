"""Weight quantization schemes: how one tensor of any rank becomes packed tensors and back.

Every scheme works on the tensor flattened and cut into contiguous groups of ``group_size`` values
(the last group zero-padded), each with its own scale. Working on the flat tensor makes a scheme blind
to layout: a Linear weight [out, in], Mixtral's experts [E, 2I, H] and GPT-OSS's transposed experts
[E, H, 2I] are all handled alike, and groups never cross an expert boundary as long as ``group_size``
divides the size of one expert's matrix (true for every power-of-two group size and real model widths).

The maths are pure functions on plain tensors. They also run on the ``meta`` device, which is how
``from_pretrained`` builds the packed skeleton of a quantized checkpoint without touching real data.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

# -- int8: symmetric absmax per group ------------------------------------------------------------------
# No library is used here on purpose: bitsandbytes' 8-bit path is LLM.int8 (Int8Params bound to
# Linear8bitLt, row-wise with an outlier threshold), not a storage format for arbitrary tensors, and
# torchao's Int8WeightOnlyConfig stores a tensor subclass that needs torchao to load and does not go
# through a plain safetensors state dict. Symmetric absmax int8 is four elementwise torch ops that run
# identically on every device, which is also what makes save/reload bit-exact.

INT8_MAX = 127
INT4_MAX = 7


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``weight`` flattened, zero-padded to a multiple of ``group_size``, as [groups, group_size] float32."""
    flat = weight.detach().reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.reshape(-1, group_size)


def _ungroup(values: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    return values.reshape(-1)[:numel].reshape(shape).to(dtype)


def absmax_quantize(weight: torch.Tensor, group_size: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization: integer codes in [-qmax, qmax] (int8) and one float32 scale per group."""
    groups = _groups(weight, group_size)
    scale = groups.abs().amax(dim=1, keepdim=True) / qmax
    # an all-zero group keeps scale 0 and codes 0; the clamp only avoids 0/0
    codes = torch.round(groups / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-qmax, qmax)
    return codes.to(torch.int8), scale


def absmax_dequantize(codes: torch.Tensor, scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return _ungroup(codes.float() * scale, shape, dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes in [-8, 7] per uint8 (even index in the low nibble); last dim must be even."""
    biased = (codes.to(torch.int16) + 8).to(torch.uint8)
    return biased[..., 0::2] | (biased[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# -- the registry --------------------------------------------------------------------------------------


class QuantScheme(ABC):
    """One weight-only quantization format. Stateless: shape, dtype and group size come with each call."""

    name: ClassVar[str]
    bits: ClassVar[int]
    default_group_size: ClassVar[int]
    description: ClassVar[str]

    def check_group_size(self, group_size: int) -> None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} for scheme {self.name!r}; expected a positive integer")

    @abstractmethod
    def quantize(self, weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
        """The packed tensors that replace ``weight`` (they are what is stored and saved)."""

    @abstractmethod
    def dequantize(
        self, packed: tuple[torch.Tensor, ...], shape: torch.Size, dtype: torch.dtype, group_size: int
    ) -> torch.Tensor:
        """``weight`` back, approximately, with its original shape and dtype."""

    def is_available(self) -> str | None:
        """None when usable here, else the reason (e.g. a missing library)."""
        return None


class Int8Scheme(QuantScheme):
    name = "int8"
    bits = 8
    default_group_size = 128
    description = "symmetric absmax int8 per group of values, float32 scales (pure torch)"

    def quantize(self, weight, group_size):
        return absmax_quantize(weight, group_size, INT8_MAX)

    def dequantize(self, packed, shape, dtype, group_size):
        codes, scale = packed
        return absmax_dequantize(codes, scale, shape, dtype)


class Int4Scheme(QuantScheme):
    """Group-wise symmetric int4, two codes per byte.

    Kept next to nf4 as a dependency-free 4-bit format; nf4 places its 16 levels at normal quantiles and
    is usually the more accurate of the two on trained weights.
    """

    name = "int4"
    bits = 4
    default_group_size = 64
    description = "symmetric absmax int4 per group, two codes per byte, float32 scales (pure torch)"

    def check_group_size(self, group_size):
        super().check_group_size(group_size)
        if group_size % 2:
            raise ValueError(f"group_size={group_size} for scheme 'int4'; two codes share a byte, so it must be even")

    def quantize(self, weight, group_size):
        codes, scale = absmax_quantize(weight, group_size, INT4_MAX)
        return pack_int4(codes), scale

    def dequantize(self, packed, shape, dtype, group_size):
        nibbles, scale = packed
        return absmax_dequantize(unpack_int4(nibbles), scale, shape, dtype)


class NF4Scheme(QuantScheme):
    """NormalFloat-4 blockwise quantization with bitsandbytes' kernels (CPU and CUDA).

    bitsandbytes' own ``replace_parameter_4bit`` stores its quantization state under extra state-dict
    keys that ``from_pretrained`` does not know, so only its functional ``quantize_4bit`` /
    ``dequantize_4bit`` are used and the state is kept as two plain tensors: packed codes and absmax.
    """

    name = "nf4"
    bits = 4
    default_group_size = 64
    description = "bitsandbytes NF4, blockwise absmax in float32 (no double quantization)"
    _allowed_group_sizes = (32, 64, 128, 256, 512, 1024, 2048, 4096)

    def check_group_size(self, group_size):
        if group_size not in self._allowed_group_sizes:
            raise ValueError(
                f"group_size={group_size!r} for scheme 'nf4'; bitsandbytes accepts {list(self._allowed_group_sizes)}"
            )

    def is_available(self):
        try:
            import bitsandbytes.functional  # noqa: F401
        except ImportError as exc:
            return f"scheme 'nf4' needs bitsandbytes (pip install bitsandbytes): {exc}"
        return None

    def quantize(self, weight, group_size):
        import bitsandbytes.functional as bnb_functional

        weight = weight.detach()
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.float()
        # Always hand bitsandbytes a 1D tensor: its blocks run over the flattened tensor, but its 0.50 CPU
        # dequantize kernel treats blocks as lying within rows of the last dim, which silently corrupts
        # tensors whose last dim is not a multiple of the block size (relative error 0.47 instead of 0.09
        # on a [768, 32] weight with blocks of 64).
        packed, state = bnb_functional.quantize_4bit(
            weight.reshape(-1).contiguous(), blocksize=group_size, quant_type="nf4", compress_statistics=False
        )
        return packed, state.absmax

    def dequantize(self, packed, shape, dtype, group_size):
        import bitsandbytes.functional as bnb_functional

        codes, absmax = packed
        state = bnb_functional.QuantState(
            absmax=absmax,
            shape=torch.Size((math.prod(shape),)),
            dtype=dtype,
            blocksize=group_size,
            code=_nf4_code(codes.device),
            quant_type="nf4",
        )
        return bnb_functional.dequantize_4bit(codes, state).reshape(shape)


_NF4_CODES: dict[torch.device, torch.Tensor] = {}


def _nf4_code(device: torch.device) -> torch.Tensor:
    if device not in _NF4_CODES:
        import bitsandbytes.functional as bnb_functional

        _NF4_CODES[device] = bnb_functional.get_4bit_type("nf4", device=device)
    return _NF4_CODES[device]


SCHEMES: dict[str, QuantScheme] = {}


def register_scheme(scheme: QuantScheme) -> QuantScheme:
    if scheme.name in SCHEMES:
        raise ValueError(f"a quantization scheme named {scheme.name!r} is already registered")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> QuantScheme:
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantization scheme {name!r}; known schemes: {sorted(SCHEMES)}") from None


for _scheme in (Int8Scheme(), Int4Scheme(), NF4Scheme()):
    register_scheme(_scheme)
