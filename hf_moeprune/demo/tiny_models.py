"""Tiny randomly initialised MoE models of every supported family, for tests, examples and demos.

Nothing is downloaded: each family's registration (``adapters/families.py``) carries the keyword arguments of a
config with a few hundred thousand parameters at most.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import transformers

from hf_moeprune.adapters import ADAPTERS, get_adapter
from hf_moeprune.adapters.base import join_path
from hf_moeprune.format.modeling_moeprune import get_submodule_attr


class _TinyConfigs(Mapping):
    """model_type -> (config class name, fields), read from the registry (a live view: families registered later
    appear too)."""

    def __getitem__(self, model_type: str) -> tuple[str, Mapping[str, Any]]:
        adapter = ADAPTERS[model_type]
        if not adapter.tiny_config:
            raise KeyError(model_type)
        return adapter.config_class, MappingProxyType(dict(adapter.tiny_config))

    def __iter__(self):
        return (name for name, adapter in ADAPTERS.items() if adapter.tiny_config)

    def __len__(self) -> int:
        return sum(1 for _ in self)


TINY_CONFIGS: Mapping[str, tuple[str, Mapping[str, Any]]] = _TinyConfigs()


def tiny_config(model_type: str, **overrides: Any) -> transformers.PreTrainedConfig:
    """A tiny config of ``model_type``; ``overrides`` replace any field."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for model_type {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    class_name, fields = TINY_CONFIGS[model_type]
    config_cls = getattr(transformers, class_name)
    sub = ADAPTERS[model_type].text_config_attr
    if sub is not None:  # a vision-language family: overrides of the language model's fields go to its sub-config
        own = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
        text = {k: v for k, v in overrides.items() if k not in own}
        overrides = {k: v for k, v in overrides.items() if k in own}
        if text:
            overrides[sub] = {**fields.get(sub, {}), **text}
    return config_cls(**{**fields, **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A tiny randomly initialised model of ``model_type`` (a causal LM, or the vision-language model of a
    multimodal family) in eval mode, deterministic per seed.

    Per-expert biases initialise to zero in every family; random ones exercise their surgery and the biased
    choice: router and expert biases ~ N(0, 0.5), biases used only to choose (``e_score_correction_bias``, LFM2's
    ``expert_bias``) ~ N(0, 0.1). Expert-id tables of keep-all layers (DeepSeek-V4's ``tid2eid``) get random distinct
    ids per row.
    """
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    adapter = get_adapter(config)
    model = getattr(transformers, adapter.auto_class).from_config(config)
    biases = {f"{adapter.router_path}.{n}" for n in adapter.router_tensors[1:] if n.endswith("bias")} | {
        f"{adapter.experts_path}.{n}" for n in adapter.expert_tensors if n.endswith("bias")
    }
    biases |= {join_path(adapter.block_attr, n) for n in adapter.block_tensors if n.endswith("bias")}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(name.endswith(b) for b in biases) and not name.endswith(("e_score_correction_bias", "expert_bias")):
                param.normal_(0.0, 0.5)
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            selection_only = name.endswith("e_score_correction_bias") or name.endswith("expert_bias")
            if selection_only and any(name.endswith(b) for b in biases):
                tensor.normal_(0.0, 0.1)
        _fill_expert_tables(model, adapter)
    return model.eval()


def _fill_expert_tables(model, adapter) -> None:
    """Random distinct expert ids in each row of the expert-id tables of keep-all layers (DeepSeek-V4's ``tid2eid``,
    zeros at init: every token would pick expert 0 twice)."""
    keep_all = adapter.keep_all_experts
    if keep_all is None:
        return
    layers = adapter.decoder_layers(model)
    for index in sorted(adapter.keep_all_layers(model.config)):
        router = adapter.router(layers[index])
        experts = adapter.num_experts(layers[index])
        for name in keep_all.tables:
            table = getattr(*get_submodule_attr(router, name))
            ids = torch.rand(table.shape[0], experts).argsort(dim=-1)[:, : table.shape[1]]
            table.copy_(ids.to(table.dtype))
