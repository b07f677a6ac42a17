"""Weight-only quantization that reaches the fused 3D expert tensors of transformers v5 MoE models.

``export_compressed_tensors`` writes the compressed-tensors format that vLLM/SGLang and stock transformers read.
``quantize(model, scheme="int8" | "nf4" | "int4")`` packs experts, attention and dense projections
(optionally the LM head) and keeps routers, embeddings, norms and biases in high precision. The
quantized model saves with ``save_pretrained`` and reloads with ``from_pretrained`` after
``import hf_moeprune`` (a registered transformers quantizer, ``quant_method="hf_moeprune"``).
"""

from hf_moeprune.quantization.compressed_tensors_export import (
    CompressedTensorsExportConfig,
    UnsupportedLayoutError,
    export_compressed_tensors,
)
from hf_moeprune.quantization.config import DEFAULT_SKIP_PATTERNS, QUANT_METHOD, QuantizationConfig
from hf_moeprune.quantization.hf_quantizer import MoEPruneHfQuantizer, register_with_transformers
from hf_moeprune.quantization.packed_experts import PACKED_EXPERTS, register_packed_experts
from hf_moeprune.quantization.packed_kernels import PackedWeight, packed_kernels
from hf_moeprune.quantization.quantizer import (
    QuantizedWeight,
    QuantTarget,
    dequantize,
    model_size_bytes,
    quantize,
    quantized_targets,
    select_targets,
    weight_files_size_bytes,
)
from hf_moeprune.quantization.schemes import SCHEMES, QuantScheme, get_scheme, register_scheme

register_with_transformers()
register_packed_experts()

__all__ = [
    "CompressedTensorsExportConfig",
    "DEFAULT_SKIP_PATTERNS",
    "PACKED_EXPERTS",
    "PackedWeight",
    "UnsupportedLayoutError",
    "export_compressed_tensors",
    "packed_kernels",
    "QUANT_METHOD",
    "SCHEMES",
    "MoEPruneHfQuantizer",
    "QuantScheme",
    "QuantTarget",
    "QuantizationConfig",
    "QuantizedWeight",
    "dequantize",
    "get_scheme",
    "model_size_bytes",
    "quantize",
    "quantized_targets",
    "register_scheme",
    "register_with_transformers",
    "select_targets",
    "weight_files_size_bytes",
]
