"""hf_moeprune: prune, balance, compress and serve Mixture-of-Experts models with Hugging Face Transformers.

``import hf_moeprune`` registers the pruned-model classes with the Auto classes, so pruned checkpoints load
with ``AutoModelForCausalLM.from_pretrained``. Heavier parts (trainer, compression, serving) load on first use.
"""

from importlib import import_module

from hf_moeprune.adapters import ADAPTERS, KeepAllExperts, MoEAdapter, get_adapter, register_adapter, register_family
from hf_moeprune.balancing import PlacementPlan, plan_placement
from hf_moeprune.format import PrunedConfigError, is_pruned, register_auto_classes
from hf_moeprune.quantization import (  # registers the quantizer, so quantized checkpoints load too
    QuantizationConfig,
    dequantize,
    model_size_bytes,
    quantize,
    weight_files_size_bytes,
)
from hf_moeprune.surgery import permute_experts, prune_experts, ungroup_routing

register_auto_classes()

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (keeps `import hf_moeprune` fast)
_LAZY = {
    "MoEPruneArguments": "hf_moeprune.training",
    "MoEPruneTrainer": "hf_moeprune.training",
    "MoEDistillArguments": "hf_moeprune.distillation",
    "MoEDistillTrainer": "hf_moeprune.distillation",
    "distillation_loss": "hf_moeprune.distillation",
    "CardInfo": "hf_moeprune.hub",
    "build_model_card": "hf_moeprune.hub",
    "push_to_hub": "hf_moeprune.hub",
    "write_model_card": "hf_moeprune.hub",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_moeprune' has no attribute {name!r}")


__all__ = [
    "ADAPTERS",
    "KeepAllExperts",
    "MoEAdapter",
    "PlacementPlan",
    "PrunedConfigError",
    "QuantizationConfig",
    "__version__",
    "dequantize",
    "get_adapter",
    "is_pruned",
    "model_size_bytes",
    "permute_experts",
    "plan_placement",
    "prune_experts",
    "quantize",
    "register_adapter",
    "register_family",
    "ungroup_routing",
    "weight_files_size_bytes",
    *_LAZY,
]
