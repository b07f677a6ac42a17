"""Model adapters: one declarative record per MoE family, registered by ``model_type``."""

from hf_moeprune.adapters import families  # noqa: F401  (registers the built-in families)
from hf_moeprune.adapters.base import ADAPTERS, MoEAdapter, base_model_type, get_adapter, register_adapter

__all__ = ["ADAPTERS", "MoEAdapter", "base_model_type", "get_adapter", "register_adapter"]
