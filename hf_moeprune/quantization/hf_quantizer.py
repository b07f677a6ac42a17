"""transformers integration: ``from_pretrained`` rebuilds hf_moeprune-quantized models.

A saved model's ``config.json`` carries ``quantization_config: {quant_method: "hf_moeprune", scheme: ...}``.
``import hf_moeprune`` registers the config class and the ``HfQuantizer`` below under that name; on load,
transformers builds the model on the meta device (the pruned classes already with their per-layer
expert counts), this quantizer replaces the selected tensors by empty packed ones with the same names
the checkpoint uses (``...parametrizations.<name>.original0/1``), and the ordinary loader fills them.
No custom (de)serialization is needed because the packed tensors are plain integer/float tensors.

Loading a full-precision checkpoint with ``quantization_config=QuantizationConfig(...)`` also works:
the weights load as usual and are quantized right after.
"""

from __future__ import annotations

import logging

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from hf_moeprune import compat
from hf_moeprune.quantization.config import QUANT_METHOD, QuantizationConfig
from hf_moeprune.quantization.quantizer import apply_quantization, dequantize, quantized_targets
from hf_moeprune.quantization.schemes import get_scheme

logger = logging.getLogger(__name__)


class MoEPruneHfQuantizer(HfQuantizer):
    """Builds and loads the packed tensors of a ``QuantizationConfig``; see the module docstring."""

    requires_calibration = False
    quantization_config: QuantizationConfig

    def validate_environment(self, *args, **kwargs):
        problem = get_scheme(self.quantization_config.scheme).is_available()
        if problem:
            raise ImportError(problem)

    @property
    def quantized_element_size(self) -> float | None:
        return get_scheme(self.quantization_config.scheme).bits / 8

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # Quantization happens per whole tensor after loading (not per loaded shard), see below.
        return False

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            targets = apply_quantization(model, self.quantization_config)
            logger.info("prepared %d packed %s tensors for loading", len(targets), self.quantization_config.scheme)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            from hf_moeprune.quantization.quantizer import keep_encoders_in_high_precision, use_pruned_format

            use_pruned_format(model)
            keep_encoders_in_high_precision(model, self.quantization_config)
            apply_quantization(model, self.quantization_config)
            return model
        # the loader flags every tensor it filled from the checkpoint; an unflagged packed tensor holds garbage
        unloaded = [name for name in quantized_targets(model) if not _packed_was_loaded(model, name)]
        if unloaded:
            raise ValueError(
                f"the checkpoint has no packed data for {len(unloaded)} tensor(s) that its quantization_config "
                f"({self.quantization_config.scheme}, include_lm_head={self.quantization_config.include_lm_head}) "
                f"selects, e.g. {unloaded[:3]}; the config.json does not match the weights"
            )
        # safetensors memory-maps tensors at arbitrary offsets; BLAS picks other SIMD paths for unaligned data
        # (last-bit differences), so copy those into aligned memory to reproduce the saved model's logits exactly.
        from hf_moeprune.format.modeling_moeprune import _align_cpu_tensors

        _align_cpu_tensors(model)
        return model

    def _dequantize(self, model, dtype=None):
        return dequantize(model)

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        # adapters on top of the packed base train (QLoRA): the packed tensors themselves never do (integer
        # storage, frozen by quantize), and Trainer still refuses a quantized model without adapters
        return True


def _packed_was_loaded(model, full_name: str) -> bool:
    module_name, _, tensor_name = full_name.rpartition(".")
    chain = model.get_submodule(module_name).parametrizations[tensor_name]
    return all(compat.is_hf_initialized(t) for t in chain.parameters(recurse=False))


def register_with_transformers() -> None:
    """Register the config and quantizer under ``quant_method="hf_moeprune"`` (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(QuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not MoEPruneHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(MoEPruneHfQuantizer)
