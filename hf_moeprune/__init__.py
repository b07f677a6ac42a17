"""hf_moeprune: prune, balance, compress and serve Mixture-of-Experts models with Hugging Face Transformers."""

from hf_moeprune.adapters import ADAPTERS, MoEAdapter, get_adapter, register_adapter
from hf_moeprune.format import PrunedConfigError, is_pruned, register_auto_classes
from hf_moeprune.surgery import permute_experts, prune_experts

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "MoEAdapter",
    "PrunedConfigError",
    "__version__",
    "get_adapter",
    "is_pruned",
    "permute_experts",
    "prune_experts",
    "register_adapter",
]
