"""Write a MoE model as a compressed-tensors ``pack-quantized`` checkpoint (W4A16 / W8A16).

That is the format vLLM and SGLang serve for weight-only int4/int8 MoE models, and that stock transformers
loads with the ``compressed-tensors`` package installed (no hf_moeprune, no remote code). Both read the
architecture's *original* checkpoint names, one tensor set per expert, e.g. for Mixtral
``model.layers.N.block_sparse_moe.experts.I.w1.weight_packed`` / ``.weight_scale`` / ``.weight_shape``.

How the layout is obtained: transformers' own ``save_pretrained`` writes a stock model under those names
(its conversion mapping splits the fused ``experts.gate_up_proj`` back into per-expert ``w1``/``w3`` or
``gate_proj``/``up_proj`` tensors), so the model is first saved in full precision into a staging folder
and every shard is then rewritten: each selected 2D ``*.weight`` becomes the three compressed-tensors
tensors, packed by compressed-tensors' ``PackedQuantizationCompressor`` (eight int4 or four int8 values
per int32, low bits first, which is also what vLLM's WNA16 kernels unpack). The scales come from
compressed-tensors' ``calculate_qparams`` (symmetric min-max), exactly as llm-compressor's RTN path.

On load, transformers dequantizes the per-expert tensors and merges them into its fused 3D experts
(``CompressedTensorsDequantize`` + the family's ``WeightConverter``), and keeps attention ``Linear``
layers packed. A family whose experts transformers keeps fused on disk (GPT-OSS in 5.24: no conversion
mapping, ``mlp.experts.gate_up_proj`` is a 3D tensor) cannot be expressed in this format, because
compressed-tensors quantizes per-module 2D weights only; such a model is refused with that reason.

A vision-language model's vision tower (every module outside the language model and its LM head:
``quantizer.encoder_module_names``) is written in full precision and its Linear layers are listed under ``ignore``,
as the hf_moeprune format keeps it too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hf_moeprune.format.layout import is_pruned_config
from hf_moeprune.quantization.config import DEFAULT_SKIP_PATTERNS, LM_HEAD_PATTERN

logger = logging.getLogger(__name__)

CT_FORMAT = "pack-quantized"
DEFAULT_W4_GROUP_SIZE = 128
STAGING_DIRNAME = ".fp-staging"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FUSED_WEIGHT_RE = re.compile(r"(experts|_proj|_linear)(\.weight)?$")


@dataclass(frozen=True)
class CTScheme:
    """A compressed-tensors weight-only scheme: bits and how scales are laid out."""

    name: str
    num_bits: int
    strategy: str  # "group" (one scale per group_size input values of a row) or "channel" (one per row)
    description: str


CT_SCHEMES: dict[str, CTScheme] = {}


def register_ct_scheme(scheme: CTScheme) -> CTScheme:
    if scheme.name in CT_SCHEMES:
        raise ValueError(f"a compressed-tensors scheme named {scheme.name!r} is already registered")
    CT_SCHEMES[scheme.name] = scheme
    return scheme


register_ct_scheme(CTScheme("W4A16", 4, "group", "symmetric int4, one scale per group of input values"))
register_ct_scheme(CTScheme("W8A16", 8, "channel", "symmetric int8, one scale per output channel"))

# hf_moeprune's scheme names -> the compressed-tensors scheme written for them
SCHEME_FOR: dict[str, str] = {"int4": "W4A16", "int8": "W8A16"}


def get_ct_scheme(name: str) -> CTScheme:
    key = SCHEME_FOR.get(name, name)
    try:
        return CT_SCHEMES[key]
    except (KeyError, TypeError):
        raise ValueError(
            f"scheme {name!r} has no compressed-tensors form; accepted: {sorted(SCHEME_FOR)} "
            f"(written as {[SCHEME_FOR[k] for k in sorted(SCHEME_FOR)]}) or {sorted(CT_SCHEMES)}"
        ) from None


@dataclass
class CompressedTensorsExportConfig:
    """What ``export_compressed_tensors`` writes."""

    scheme: str = field(default="int4", metadata={"help": "int4 (W4A16, grouped) or int8 (W8A16, per channel)"})
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "W4A16 only: input values per scale. Default 128, or the largest divisor of every quantized "
            "input width that is <= 128 when some width is not a multiple of 128 (tiny models)"
        },
    )
    include_lm_head: bool = field(default=False, metadata={"help": "also quantize the LM head"})

    def __post_init__(self):
        scheme = get_ct_scheme(self.scheme)
        self.scheme = scheme.name
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size={self.group_size!r}; expected a positive integer")
            if scheme.strategy != "group":
                raise ValueError(
                    f"group_size={self.group_size} with {scheme.name}: that scheme has one scale per output channel"
                )


class UnsupportedLayoutError(ValueError):
    """The model cannot be written in the compressed-tensors format (the message says why)."""


def choose_group_size(in_features: list[int], requested: int | None) -> int:
    """The W4A16 group size: ``requested`` when it divides every input width, else an error; with no
    request 128, or (for widths that 128 does not divide, e.g. tiny test models) the largest divisor of
    all widths that is <= 128. vLLM's Marlin kernels accept 32/64/128 for real checkpoints."""
    if not in_features:
        raise ValueError("no tensor to quantize, so no group size to choose")
    if requested is not None:
        bad = sorted({n for n in in_features if n % requested})
        if bad:
            raise ValueError(f"group_size={requested} does not divide the input width(s) {bad} of quantized weights")
        return requested
    common = math.gcd(*in_features)
    size = max(d for d in range(1, min(common, DEFAULT_W4_GROUP_SIZE) + 1) if common % d == 0)
    if size != DEFAULT_W4_GROUP_SIZE:
        logger.warning(
            "W4A16: group size %d instead of %d, the largest divisor of every quantized input width (gcd %d); "
            "recorded in config.json",
            size,
            DEFAULT_W4_GROUP_SIZE,
            common,
        )
    return size


def quantization_args(scheme: CTScheme, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=scheme.num_bits,
        type="int",
        symmetric=True,
        strategy=scheme.strategy,
        group_size=group_size if scheme.strategy == "group" else None,
        dynamic=False,
    )


def ct_quantization_scheme(scheme: CTScheme, group_size: int | None):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=quantization_args(scheme, group_size), format=CT_FORMAT)


def compress_weight(weight: torch.Tensor, ct_scheme) -> dict[str, torch.Tensor]:
    """One [out, in] weight -> ``weight_packed`` (int32), ``weight_scale`` (weight's dtype), ``weight_shape``."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = ct_scheme.weights
    w = weight.detach()
    if args.strategy == "group":
        grouped = w.reshape(w.shape[0], w.shape[1] // args.group_size, args.group_size)
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    scale, zero_point = calculate_qparams(lo, hi, args)
    state = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero_point}
    return dict(PackedQuantizationCompressor.compress(state, ct_scheme))


def decompress_weight(tensors: dict[str, torch.Tensor], ct_scheme) -> torch.Tensor:
    """The dense weight that ``compress_weight``'s tensors stand for (what every loader reconstructs)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    return PackedQuantizationCompressor.decompress(dict(tensors), ct_scheme)["weight"]


def _skip_patterns(include_lm_head: bool) -> list[str]:
    patterns = list(DEFAULT_SKIP_PATTERNS)
    return patterns if include_lm_head else [*patterns, LM_HEAD_PATTERN]


def _skip_rule(model: nn.Module, include_lm_head: bool) -> Callable[[str], bool]:
    """Whether a checkpoint key stays in full precision: it matches a default skip pattern, or it belongs to a
    vision (or audio) tower of a multimodal model (``encoder_module_names``, matched on the model-side name the key
    loads into, since a family's conversion mapping may rename the towers on disk)."""
    from hf_moeprune import compat
    from hf_moeprune.quantization.quantizer import encoder_module_names

    patterns = _skip_patterns(include_lm_head)
    encoders = tuple(f"{name}." for name in encoder_module_names(model))
    if not encoders:
        return lambda key: any(re.search(p, key) for p in patterns)
    conversions, meta_state = compat.load_conversions(model), model.state_dict()

    def skipped(key: str) -> bool:
        if any(re.search(p, key) for p in patterns):
            return True
        return compat.converted_key(key, conversions, model.base_model_prefix, meta_state).startswith(encoders)

    return skipped


def _is_target(name: str, tensor_ndim: int, dtype: torch.dtype, skipped: Callable[[str], bool]) -> bool:
    return name.endswith(".weight") and tensor_ndim == 2 and dtype.is_floating_point and not skipped(name)


def _shards(folder: Path) -> list[Path]:
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"save_pretrained wrote no safetensors shard into {str(folder)!r}")
    return shards


def _check_layout(staging: Path, skipped: Callable[[str], bool]) -> tuple[dict, list[int]]:
    """Read the staged checkpoint's config and headers; refuse what compressed-tensors cannot express."""
    from safetensors import safe_open

    config = json.loads((staging / "config.json").read_text())
    model_type = str(config.get("model_type"))
    if is_pruned_config(config):
        raise UnsupportedLayoutError(
            f"the model saves as {model_type!r} (experts per layer {config.get('experts_per_layer')}): its MoE layers "
            "keep different expert counts (or a learned router bias), which no stock architecture, hence no serving "
            "engine, represents; use --format hf_moeprune"
        )
    fused, widths = [], []
    for shard in _shards(staging):
        with safe_open(shard, "pt") as f:
            names = f.keys()
            for name in names:
                piece = f.get_slice(name)
                shape, dtype = piece.get_shape(), piece.get_dtype()
                floating = dtype in ("F32", "F16", "BF16", "F64")
                kept = skipped(name) or name.endswith("bias")
                # fused experts (GPT-OSS ``experts.gate_up_proj``, GraniteMoE ``input_linear.weight``); other 3D
                # tensors, e.g. MiniMax's attention decay buffers, are not matmul weights and stay as they are
                if len(shape) >= 3 and floating and not kept and FUSED_WEIGHT_RE.search(name):
                    fused.append(f"{name} {list(shape)}")
                elif len(shape) == 2 and floating and name.endswith(".weight") and not kept:
                    widths.append(shape[1])
    if fused:
        raise UnsupportedLayoutError(
            f"transformers writes {model_type}'s experts as fused 3D tensors (e.g. {fused[0]}), not per-expert "
            "Linear weights; compressed-tensors quantizes per-module 2D weights only, and transformers "
            f"{_transformers_version()} has no conversion that would load per-expert quantized tensors into "
            f"{model_type}'s fused experts. Use --format hf_moeprune for this family"
        )
    return config, widths


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@dataclass
class ExportSummary:
    scheme: str
    group_size: int | None
    quantized_tensors: int
    ignored_modules: list[str]
    bytes_on_disk: int


def export_compressed_tensors(model: nn.Module, folder: str | os.PathLike, config: CompressedTensorsExportConfig):
    """Write ``model`` (full precision, stock or uniformly pruned) into ``folder`` as a compressed-tensors
    checkpoint. ``folder`` must be empty (the CLI passes an ``atomic_output_dir``). Returns an ``ExportSummary``;
    raises ``UnsupportedLayoutError`` (nothing usable written) for a layout the format cannot hold."""
    from compressed_tensors.quantization import QuantizationConfig as CTQuantizationConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    if getattr(model, "is_quantized", False):
        raise ValueError("the model is already quantized; export the full-precision model")
    folder = Path(folder)
    staging = folder / STAGING_DIRNAME
    model.save_pretrained(staging)
    skipped = _skip_rule(model, config.include_lm_head)
    hf_config, widths = _check_layout(staging, skipped)
    scheme = get_ct_scheme(config.scheme)
    group_size = choose_group_size(widths, config.group_size) if scheme.strategy == "group" else None
    ct_scheme = ct_quantization_scheme(scheme, group_size)

    weight_map: dict[str, str] = {}
    ignored: list[str] = []
    count = 0
    for shard in _shards(staging):
        out: dict[str, torch.Tensor] = {}
        with safe_open(shard, "pt") as f:
            metadata = f.metadata() or {}
            names = f.keys()
            for name in names:
                tensor = f.get_tensor(name)
                if _is_target(name, tensor.ndim, tensor.dtype, skipped):
                    prefix = name[: -len("weight")]
                    for suffix, value in compress_weight(tensor, ct_scheme).items():
                        out[prefix + suffix] = value.contiguous()
                    count += 1
                else:
                    out[name] = tensor
                    # Linear-shaped weights left in full precision must be named, or vLLM (which builds the
                    # router and LM head as Linear layers with the quant config) expects packed tensors there.
                    if name.endswith(".weight") and tensor.ndim == 2 and "embed_tokens" not in name:
                        ignored.append(name[: -len(".weight")])
        save_file(out, folder / shard.name, metadata={**metadata, "format": "pt"})
        weight_map.update(dict.fromkeys(out, shard.name))
    if (staging / SAFETENSORS_INDEX).is_file():
        index = json.loads((staging / SAFETENSORS_INDEX).read_text())
        total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        index["weight_map"] = dict(sorted(weight_map.items()))
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for extra in staging.iterdir():
        if extra.name != "config.json" and extra.suffix != ".safetensors" and extra.name != SAFETENSORS_INDEX:
            shutil.move(str(extra), folder / extra.name)
    shutil.rmtree(staging)

    ct_config = CTQuantizationConfig(
        config_groups={"group_0": ct_scheme},
        format=CT_FORMAT,
        quantization_status="compressed",
        ignore=sorted(set(ignored)),
    )
    hf_config["quantization_config"] = ct_config.to_dict() if hasattr(ct_config, "to_dict") else ct_config.model_dump()
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True, default=str) + "\n")
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    logger.info(
        "wrote %s (%s) with %d packed weights, group %s, %d modules kept in full precision: %s",
        folder,
        scheme.name,
        count,
        group_size,
        len(set(ignored)),
        f"{size:,} bytes",
    )
    return ExportSummary(scheme.name, group_size, count, sorted(set(ignored)), size)
