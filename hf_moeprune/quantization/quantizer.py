"""Quantize a model's weights in place, fused 3D expert tensors included, and measure its real size.

Each selected tensor becomes a ``torch.nn.utils.parametrize`` parametrization: the packed tensors are
stored as ``<module>.parametrizations.<name>.original0`` (codes) and ``original1`` (scales/absmax),
and reading ``module.<name>`` dequantizes on the fly. That is what lets every consumer keep working
unchanged: ``nn.Linear.forward`` and all of transformers' expert kernels (eager, grouped_mm,
batched_mm in ``integrations/moe.py``) read ``self.weight`` / ``self.gate_up_proj`` as plain tensors.

Memory/speed trade-off: weights rest packed (that is the saving), and each forward re-creates one
full-precision copy of a tensor while its module runs, then frees it; peak extra memory is about the
largest single tensor (one layer's experts), and every forward pays one dequantization per tensor
(elementwise, cheap next to the matmul for batched prompts, noticeable for one-token decoding). Expert
modules read their weights once per forward under grouped_mm/batched_mm, but once per selected
expert under ``eager``; a cache scoped to the experts module's forward (below) makes that once too.
For CPU inference none of this dequantization happens: reads return ``PackedWeight`` handles and experts
run on hf_moeprune's own experts implementation (``packed_kernels.py``, ``packed_experts.py``).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from tqdm.auto import tqdm

from hf_moeprune import compat
from hf_moeprune.quantization.config import QuantizationConfig
from hf_moeprune.quantization.packed_experts import PACKED_EXPERTS
from hf_moeprune.quantization.packed_kernels import (
    PackedWeight,
    can_use_packed,
    expert_rows,
    int4_kernel_weights,
    int8_kernel_weights,
)
from hf_moeprune.quantization.schemes import get_scheme

logger = logging.getLogger(__name__)

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class QuantizedWeight(nn.Module):
    """Parametrization that holds nothing but metadata; the packed tensors are its ``original0..n``."""

    def __init__(self, scheme: str, group_size: int, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.scheme = scheme
        self.group_size = group_size
        self.shape = torch.Size(shape)
        self.dtype = dtype

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return get_scheme(self.scheme).quantize(weight, self.group_size)

    def forward(self, *packed: torch.Tensor) -> torch.Tensor | PackedWeight:
        # inference on CPU: a handle that F.linear multiplies with the packed kernels (see packed_kernels.py);
        # checked before no_grad, because the kernels have no backward
        if can_use_packed(self.scheme, self.group_size, self.shape, packed):
            return self.packed_handle(packed)
        with torch.no_grad():
            return self.dequantize_packed(packed)

    def packed_handle(self, packed: tuple[torch.Tensor, ...]) -> PackedWeight:
        """The ``PackedWeight`` of this stored data: one per data, reused, because it carries the kernel copies
        (rebuilt when the data is replaced, e.g. by expert surgery)."""
        handle = self.__dict__.get("_packed_handle")
        if handle is None or any(a is not b for a, b in zip(handle.packed, packed)):
            handle = self.__dict__["_packed_handle"] = PackedWeight(self, packed)
        return handle

    def dequantize_packed(self, packed: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return get_scheme(self.scheme).dequantize(packed, self.shape, self.dtype, self.group_size)

    def dequantize_expert(self, packed: tuple[torch.Tensor, ...], expert: int) -> torch.Tensor:
        rows = expert_rows(packed, self.shape, self.group_size, expert)
        return get_scheme(self.scheme).dequantize(rows, self.shape[1:], self.dtype, self.group_size)

    def kernel_weights(self, packed: tuple[torch.Tensor, ...], expert: int | None, transposed: bool = False):
        """The GEMV kernel's copy of one expert (or of the 2D tensor); ``PackedWeight`` keeps it after first use.
        ``transposed``: the expert is stored ``[in, out]``, the copy is made ``[out, in]`` (int8 for either scheme)."""
        out_features, in_features = self.shape[-2], self.shape[-1]
        if self.scheme == "int4" and not transposed:
            nibbles, scale = expert_rows(packed, self.shape, self.group_size, expert)
            return int4_kernel_weights(nibbles, scale, out_features, in_features, self.group_size)
        dense = self.dequantize_packed(packed) if expert is None else self.dequantize_expert(packed, expert)
        return int8_kernel_weights(dense.t() if transposed else dense)

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, group_size={self.group_size}, shape={tuple(self.shape)}, dtype={self.dtype}"


@dataclass(frozen=True)
class QuantTarget:
    """One tensor to quantize: ``module_name`` (dotted, relative to the model) and its ``tensor_name``."""

    module_name: str
    tensor_name: str

    @property
    def full_name(self) -> str:
        return f"{self.module_name}.{self.tensor_name}" if self.module_name else self.tensor_name


def _tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another name (e.g. a tied LM head)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.update((name, seen[id(param)]))
        else:
            seen[id(param)] = name
    return tied


def select_targets(model: nn.Module, config: QuantizationConfig) -> list[QuantTarget]:
    """The tensors ``config`` quantizes in ``model``, in module order.

    Candidates are floating-point parameters of rank >= 2 not named ``*bias`` (so norms, biases, GPT-OSS
    expert biases and buffers such as DeepSeek's ``e_score_correction_bias`` never are); of those, the
    ones matching a skip pattern stay. Tied parameters are skipped with a warning: quantizing a tied LM
    head would quantize the embedding too.
    """
    tied = _tied_parameter_names(model)
    targets = []
    for module_name, module in model.named_modules():
        if "parametrizations" in module_name.split("."):
            continue  # the packed tensors of an already quantized tensor
        for tensor_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{tensor_name}" if module_name else tensor_name
            if param.ndim < 2 or not param.is_floating_point() or tensor_name.endswith("bias"):
                continue
            if config.is_skipped(full):
                continue
            if full in tied:
                logger.warning("not quantizing %s: it is tied to another parameter", full)
                continue
            targets.append(QuantTarget(module_name, tensor_name))
    return targets


def encoder_module_names(model: nn.Module) -> list[str]:
    """The modules of a multimodal model outside its language model and LM head: vision (and audio) towers and the
    projectors/mergers that feed the language model (``model.visual`` for Qwen3-VL-MoE and GLM-4.5V,
    ``model.vision_tower`` and ``model.audio_tower`` for dots3). Empty for a text-only model.

    Found from the structure, not from names: the language model is the shallowest module on the path to the decoder
    layers whose config is the text sub-config; every other child of the modules above it that holds parameters,
    except the output embeddings, is an encoder."""
    from hf_moeprune.adapters import get_adapter

    try:
        adapter = get_adapter(model)
    except ValueError:
        return []
    if adapter.text_config_attr is None or not hasattr(model, "config"):
        return []
    layers = adapter.decoder_layers(model)
    path = next((name for name, module in model.named_modules() if module is layers), None)
    if not path:
        return []
    parts = path.split(".")
    text_config_type = type(adapter.moe_config(model.config))
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
    language_model = next(
        (p for p in prefixes if isinstance(getattr(model.get_submodule(p), "config", None), text_config_type)),
        ".".join(parts[:-1]),
    )
    above = [""] + [p for p in prefixes if language_model.startswith(p + ".")]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for parent in above:
        for child_name, child in model.get_submodule(parent).named_children():
            name = f"{parent}.{child_name}" if parent else child_name
            if name == language_model or name in above or child is head:
                continue
            if any(True for _ in child.parameters()):
                found.append(name)
    return found


def keep_encoders_in_high_precision(model: nn.Module, config: QuantizationConfig) -> list[str]:
    """Add a skip pattern per encoder module of a multimodal model (``encoder_module_names``) to
    ``config.skip_patterns``, in place, so that the vision tower and its projector stay in their dtype and the saved
    ``quantization_config`` says so (a reload selects the same tensors from the config alone). Vision towers are small
    next to the experts and their errors reach every image token, so they are kept like the routers. Returns the
    module names (empty for a text model)."""
    names = encoder_module_names(model)
    for name in names:
        pattern = rf"^{re.escape(name)}\."
        if pattern not in config.skip_patterns:
            config.skip_patterns.append(pattern)
    if names:
        logger.info("kept in high precision (outside the language model): %s", ", ".join(names))
    return names


def quantized_targets(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Full name -> parametrization, for every tensor of ``model`` quantized by hf_moeprune."""
    found = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            for p in chain:
                if isinstance(p, QuantizedWeight):
                    found[f"{module_name}.{tensor_name}" if module_name else tensor_name] = p
    return found


def _enable_cache(module: nn.Module, args: Any) -> None:
    compat.enter_parametrize_cache()


def _disable_cache(module: nn.Module, args: Any, output: Any) -> None:
    # always_call=True runs this even when forward raised, possibly before _enable_cache (compat keeps the count >= 0)
    compat.exit_parametrize_cache()


def _install_cache_hooks(module: nn.Module) -> None:
    if getattr(module, "_moeprune_cache_hooks", None):
        return
    module._moeprune_cache_hooks = (
        module.register_forward_pre_hook(_enable_cache),
        module.register_forward_hook(_disable_cache, always_call=True),
    )


def _remove_cache_hooks(module: nn.Module) -> None:
    for handle in getattr(module, "_moeprune_cache_hooks", None) or ():
        handle.remove()
    module.__dict__.pop("_moeprune_cache_hooks", None)


def apply_quantization(
    model: nn.Module, config: QuantizationConfig, targets: Iterable[QuantTarget] | None = None
) -> list[QuantTarget]:
    """Replace each target tensor by its packed form (on meta tensors this only builds the skeleton)."""
    scheme = get_scheme(config.scheme)
    problem = scheme.is_available()
    if problem:
        raise RuntimeError(problem)
    targets = list(select_targets(model, config) if targets is None else targets)
    on_meta = any(getattr(model.get_submodule(t.module_name), t.tensor_name).is_meta for t in targets)
    for target in tqdm(targets, desc=f"quantize {config.scheme}", disable=on_meta or len(targets) < 8):
        module = model.get_submodule(target.module_name)
        param = getattr(module, target.tensor_name)
        # packed integer tensors cannot require grad; this is weight-only inference quantization
        param.requires_grad_(False)
        parametrization = QuantizedWeight(config.scheme, config.group_size, param.shape, param.dtype)
        # unsafe=True skips torch's check that forward(right_inverse(w)) has w's shape/dtype, which would
        # dequantize every tensor once more; schemes are tested for that property instead.
        parametrize.register_parametrization(module, target.tensor_name, parametrization, unsafe=True)
        if param.ndim >= 3:
            _install_cache_hooks(module)
    if targets and hasattr(model, "set_experts_implementation") and not torch.cuda.is_available():
        # hf_moeprune's experts runtime (packed_experts.py) multiplies only the experts that received tokens, with
        # kernel copies prepared once; grouped_mm would dequantize every expert on every forward. Kept to CPU-only
        # machines, where those kernels exist (the CUDA path dequantizes, as before); the runtime itself falls
        # back to the eager loop wherever the kernels do not apply (grad enabled, other schemes, other devices).
        try:
            model.set_experts_implementation(PACKED_EXPERTS)
        except (ValueError, AttributeError) as exc:  # a model without experts_implementation support
            logger.debug("experts implementation left as it was: %s", exc)
    return targets


def _attach(model: nn.Module, config: QuantizationConfig) -> None:
    """Make ``model`` look like transformers' own quantized models, so save_pretrained writes the config."""
    from hf_moeprune.quantization.hf_quantizer import MoEPruneHfQuantizer

    model.hf_quantizer = MoEPruneHfQuantizer(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if hasattr(model, "config"):
        model.config.quantization_config = config


def use_pruned_format(model: nn.Module) -> None:
    """Give a stock MoE model its pruned class (all experts kept), so its quantized checkpoint is written as
    ``moeprune_<family>``: without hf_moeprune, transformers then refuses it (unknown model type, or the
    shipped modeling file's check under trust_remote_code) instead of skipping the unknown quant_method
    and filling the model with random weights."""
    from hf_moeprune.adapters import get_adapter
    from hf_moeprune.format import PRUNED_CLASSES, is_pruned, mark_pruned

    if is_pruned(model) or not hasattr(model, "config"):
        return
    try:
        adapter = get_adapter(model)
    except ValueError:
        adapter = None
    if adapter is None or adapter.model_type not in PRUNED_CLASSES:
        logger.warning(
            "%s has no hf_moeprune pruned format: its quantized checkpoint keeps model_type %r, which transformers "
            "without hf_moeprune would load with random weights (it skips unknown quant_methods)",
            type(model).__name__,
            getattr(model.config, "model_type", None),
        )
        return
    mark_pruned(model, adapter)


def quantize(model: nn.Module, scheme: str | QuantizationConfig = "int8", **config_fields: Any) -> nn.Module:
    """Quantize ``model``'s weights in place (experts, attention, dense MLPs; optionally the LM head).

    ``scheme`` is a scheme name (``config_fields`` then fill the rest of a ``QuantizationConfig``, e.g.
    ``group_size=64, include_lm_head=True``) or a ready ``QuantizationConfig``. Routers, embeddings,
    norms and biases stay in their dtype, and so does the vision tower of a vision-language model (its patterns are
    added to the config's ``skip_patterns``: ``keep_encoders_in_high_precision``). Returns the model, which saves
    with ``save_pretrained`` and reloads with the Auto class of its family (``AutoModelForCausalLM``,
    ``AutoModelForImageTextToText``) once ``hf_moeprune`` is imported.
    """
    if isinstance(scheme, QuantizationConfig):
        if config_fields:
            raise ValueError(
                f"pass either a QuantizationConfig or config fields, not both (got {sorted(config_fields)})"
            )
        config = scheme
    else:
        config = QuantizationConfig(scheme=scheme, **config_fields)
    existing = quantized_targets(model)
    if existing or getattr(model, "is_quantized", False):
        method = getattr(getattr(model, "config", None), "quantization_config", None)
        raise ValueError(
            f"model is already quantized ({len(existing)} hf_moeprune tensors, quantization_config={method!r}); "
            "quantize the full-precision model instead"
        )
    before = model_size_bytes(model)
    use_pruned_format(model)
    keep_encoders_in_high_precision(model, config)
    targets = apply_quantization(model, config)
    if not targets:
        raise ValueError(
            f"nothing to quantize: no parameter of rank >= 2 escapes skip patterns {config.effective_skip_patterns()}"
        )
    _attach(model, config)
    logger.info(
        "quantized %d tensors with %s (group %d): %d -> %d bytes",
        len(targets),
        config.scheme,
        config.group_size,
        before,
        model_size_bytes(model),
    )
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Undo ``quantize`` in place: every packed tensor becomes a plain parameter of its dequantized value."""
    for full_name in quantized_targets(model):
        module_name, _, tensor_name = full_name.rpartition(".")
        module = model.get_submodule(module_name)
        # torch leaves a tensor that does not require grad behind as a buffer: make it a parameter again
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
        value = getattr(module, tensor_name).detach()
        delattr(module, tensor_name)
        module.register_parameter(tensor_name, nn.Parameter(value))
        if not parametrize.is_parametrized(module):
            _remove_cache_hooks(module)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    return model


def is_quantized_tensor(module: nn.Module, tensor_name: str) -> bool:
    """Whether ``module.<tensor_name>`` is stored packed by hf_moeprune (a ``QuantizedWeight`` parametrization)."""
    return parametrize.is_parametrized(module, tensor_name) and any(
        isinstance(p, QuantizedWeight) for p in module.parametrizations[tensor_name]
    )


def check_quantized_experts(module: nn.Module, tensor_name: str) -> QuantizedWeight:
    """The parametrization of a packed expert tensor whose experts can be sliced out of its packed form; raises a
    ValueError naming the tensor otherwise (called before surgery changes anything)."""
    chain = module.parametrizations[tensor_name]
    quantized = [p for p in chain if isinstance(p, QuantizedWeight)]
    if len(chain) != 1 or len(quantized) != 1:
        raise ValueError(
            f"{tensor_name}: expert surgery handles one hf_moeprune QuantizedWeight parametrization, "
            f"found {list(chain)}"
        )
    weight = quantized[0]
    num_experts, per_expert = weight.shape[0], math.prod(weight.shape[1:])
    if per_expert % weight.group_size:
        raise ValueError(
            f"{tensor_name}: quantization groups of {weight.group_size} values straddle experts of {per_expert} "
            "values, so experts cannot be removed from the packed tensor; quantize with a group_size that divides "
            "one expert's size, or prune before quantizing"
        )
    position = 0
    while hasattr(chain, f"original{position}"):
        packed = getattr(chain, f"original{position}")
        if packed.shape[0] % num_experts:
            raise ValueError(
                f"{tensor_name}: packed tensor {tuple(packed.shape)} does not split into {num_experts} experts"
            )
        position += 1
    return weight


def select_quantized_experts(module: nn.Module, tensor_name: str, index: torch.Tensor) -> None:
    """Keep experts ``index`` (dim 0, in that order) of a quantized 3D-or-more expert tensor, in place, on its
    packed form: every packed tensor (codes, scales/absmax) is cut into equal per-expert blocks of groups and the
    blocks of the kept experts are selected. No value is re-quantized, so each kept expert dequantizes to exactly
    what it did before. Needs groups that never straddle two experts (``group_size`` divides one expert's size,
    true for power-of-two groups and real model widths); refused otherwise."""
    weight = check_quantized_experts(module, tensor_name)
    chain = module.parametrizations[tensor_name]
    num_experts = weight.shape[0]
    position = 0
    while hasattr(chain, f"original{position}"):
        old = getattr(chain, f"original{position}")
        blocks = old.detach().reshape(num_experts, -1, *old.shape[1:])
        data = blocks.index_select(0, index.to(old.device)).reshape(-1, *old.shape[1:])
        # setattr on the ParametrizationList would run right_inverse (quantize again): replace the storage
        compat.replace_parametrization_original(chain, f"original{position}", nn.Parameter(data, requires_grad=False))
        position += 1
    weight.shape = torch.Size((len(index), *weight.shape[1:]))
    weight.__dict__.pop("_packed_handle", None)  # kernel copies of the old experts


def model_size_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take as stored (packed codes, scales, absmax included).

    Tied weights (one tensor under two names) count once; dequantized copies that exist only while a
    module runs do not count.
    """
    seen: set[tuple] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        # views of one mmapped file share a storage, so identify a tensor by its own data pointer and extent
        key = (tensor.device, tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if tensor.is_meta or key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def weight_files_size_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files (safetensors shards, or .bin) of a saved model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder")
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_FILE_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_FILE_SUFFIXES)}) in {str(folder)!r}")
    return sum(p.stat().st_size for p in files)
