"""Model adapters: one declarative record per MoE family, registered by ``model_type``."""

from hf_moeprune.adapters import families  # noqa: F401  (registers the built-in families)
from hf_moeprune.adapters.base import (
    ADAPTERS,
    UNSUPPORTED,
    KeepAllExperts,
    MoEAdapter,
    base_model_type,
    get_adapter,
    register_adapter,
    register_family,
    register_unsupported,
)

__all__ = [
    "ADAPTERS",
    "UNSUPPORTED",
    "KeepAllExperts",
    "MoEAdapter",
    "base_model_type",
    "get_adapter",
    "register_adapter",
    "register_family",
    "register_unsupported",
]
