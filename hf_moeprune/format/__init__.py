"""Pruned-model format: a Transformers-compatible config that records per-layer expert counts.

``import hf_moeprune`` registers one ``moeprune_<family>`` config/model pair per supported family
with the Auto classes, so ``AutoModelForCausalLM.from_pretrained(path)`` rebuilds the pruned shapes
directly. The classes themselves live in the self-contained ``modeling_moeprune.py``, which is also
what ``trust_remote_code=True`` loads where hf_moeprune is not installed.
"""

from __future__ import annotations

import transformers
from transformers import AutoConfig

from hf_moeprune import compat
from hf_moeprune.format.layout import PROVENANCE_FIELD, pruning_fields
from hf_moeprune.format.modeling_moeprune import (
    DEFAULT_ROUTER_OUTPUT,
    MODEL_TYPE_PREFIX,
    PRUNED_CLASSES,
    PRUNING_FIELDS,
    SELECTION_BIAS_ROUTER_OUTPUT,
    PrunedConfigError,
    PrunedMoEMixin,
    attach_selection_bias,
    check_pruned_config,
    enable_router_logit_padding,
    heterogeneous_load_balancing_loss,
    pad_router_logits,
    per_layer_counts,
    record_per_layer_counts,
    resize_expert_tensors,
    stock_auto_classes,
)

__all__ = [
    "MODEL_TYPE_PREFIX",
    "PRUNED_CLASSES",
    "PRUNING_FIELDS",
    "PrunedConfigError",
    "PrunedMoEMixin",
    "check_pruned_config",
    "enable_selection_bias",
    "expert_counts",
    "heterogeneous_load_balancing_loss",
    "is_pruned",
    "mark_pruned",
    "pad_router_logits",
    "per_layer_counts",
    "record_per_layer_counts",
    "register_auto_classes",
    "register_pruned_classes",
    "resize_expert_tensors",
]


def register_pruned_classes(config_cls: type, model_cls: type, auto_class: str = "AutoModelForCausalLM") -> None:
    """Make ``auto_class`` (``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a vision-language
    family) load the pruned classes."""
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    getattr(transformers, auto_class).register(config_cls, model_cls, exist_ok=True)
    # save_pretrained then copies modeling_moeprune.py and writes the auto_map for trust_remote_code.
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class(auto_class)


def register_auto_classes() -> None:
    from hf_moeprune.adapters import ADAPTERS

    auto_classes = {a.model_type: a.auto_class for a in ADAPTERS.values()}
    for model_type, (config_cls, model_cls) in PRUNED_CLASSES.items():
        register_pruned_classes(config_cls, model_cls, auto_classes.get(model_type, "AutoModelForCausalLM"))
        for auto_class in stock_auto_classes(model_type, model_cls.stock_model_class):  # Gemma-4: both
            getattr(transformers, auto_class).register(config_cls, model_cls, exist_ok=True)


def is_pruned(model) -> bool:
    return isinstance(model, PrunedMoEMixin)


def expert_counts(model, adapter) -> list[int | None]:
    """Experts per decoder layer as the modules hold them (None for dense layers)."""
    return [
        adapter.num_experts(layer) if adapter.moe_block(layer) is not None else None
        for layer in adapter.decoder_layers(model)
    ]


def mark_pruned(model, adapter) -> None:
    """Turn a stock model (in place) into its pruned class, with complete pruning metadata.

    Only ``__class__`` changes, so parameters, hooks and wrappers stay valid. A stock checkpoint that
    hf_moeprune exported earlier carries ``moeprune_provenance``; its original expert ids are kept.
    """
    if is_pruned(model):
        return
    if adapter.model_type not in PRUNED_CLASSES:
        raise ValueError(f"no pruned-model classes for model_type {adapter.model_type!r}; register the family first")
    config = model.config
    counts = expert_counts(model, adapter)
    provenance = pruning_fields(config)  # a stock model is not pruned: these are a stock export's provenance
    original = (provenance and provenance.get("original_num_experts")) or adapter.num_experts_in_config(config)
    kept = (provenance and provenance.get("kept_expert_ids")) or [
        list(range(c)) if c is not None else None for c in counts
    ]
    config_cls, model_cls = PRUNED_CLASSES[adapter.model_type]
    compat.swap_class(config, config_cls)
    config.base_model_type = adapter.model_type
    config.original_num_experts = int(original)
    config.experts_per_layer = counts
    config.kept_expert_ids = kept
    config.expert_tensor_names = adapter.tensor_names
    config.expert_count_attributes = adapter.count_attributes
    config.expert_count_field = adapter.num_experts_field
    config.expert_top_k_field = adapter.top_k_field
    if adapter.extra_rows_field is not None:  # router rows after the routed experts stay at the end
        config.expert_extra_rows_field = adapter.extra_rows_field
        config.expert_extra_row_tensors = adapter.extra_row_tensor_names
        config.expert_total_count_attributes = adapter.total_count_attribute_names
    if adapter.layers_field != "num_hidden_layers":
        config.expert_layers_field = adapter.layers_field
    if adapter.text_config_attr is not None:  # a composite config: its language model's fields and layers
        config.expert_config_path = adapter.text_config_attr
        config.expert_layers_path = adapter.layers_path
    if PROVENANCE_FIELD in config.__dict__:
        del config.moeprune_provenance
    # A loaded config may carry model_type as an instance attribute, which would shadow the pruned class's;
    # and a loaded model remembers the checkpoint's key renamings (e.g. Mixtral's per-expert w1/w2/w3),
    # which the pruned format (fused tensors, saved as they are) must not apply on save.
    config.__dict__.pop("model_type", None)
    compat.forget_weight_conversions(model)
    compat.swap_class(model, model_cls)
    enable_router_logit_padding(model)  # stock aux-loss code keeps working once layers differ in width
    record_per_layer_counts(config)
    check_pruned_config(config)


def enable_selection_bias(model, adapter) -> None:
    """Give the model's routers a learned per-expert selection bias that is saved and reloaded with the model.

    Each MoE router gets a ``selection_bias`` buffer (zeros, so outputs do not change until it is trained) and
    a hook that chooses experts on score + bias while weighting them with the raw score (DeepSeek-V3's
    aux-loss-free rule, for every family). The config records where the routers are and which routing rule
    they follow, so ``from_pretrained`` (and ``trust_remote_code`` without hf_moeprune) rebuilds both; the
    buffer follows expert surgery like any per-expert tensor. Idempotent.
    """
    fixed = sorted(adapter.keep_all_layers(model.config))
    if fixed:
        why = adapter.keep_all_experts.describe(adapter.moe_config(model.config), fixed[0])
        raise ValueError(
            f"{adapter.model_type}: a selection bias would re-route MoE layers {fixed}, which pick their experts "
            f"without the router's scores ({why})"
        )
    mark_pruned(model, adapter)
    config = model.config
    config.selection_bias_router = adapter.router_path
    config.selection_bias_routing = adapter.routing
    if adapter.router_output != DEFAULT_ROUTER_OUTPUT:  # absent means the default (checkpoints from before it)
        setattr(config, SELECTION_BIAS_ROUTER_OUTPUT, adapter.router_output)
    attach_selection_bias(model, config)
