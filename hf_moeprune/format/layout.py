"""Reading a pruned model's expert layout from its config: the one reader every caller uses.

A config describes a pruned layout in one of two places: a pruned-format config (``model_type``
``moeprune_<family>``) carries the pruning fields itself; a stock export (every layer kept the same number of
experts, saved under the stock ``model_type``) carries them under ``moeprune_provenance``. The readers take a
config dict (a parsed ``config.json``) or a ``PreTrainedConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from hf_moeprune.format.modeling_moeprune import (
    COUNT_FIELD_CANDIDATES,
    MODEL_TYPE_PREFIX,
    global_expert_count,
    per_layer_counts,
)

PROVENANCE_FIELD = "moeprune_provenance"


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def is_pruned_config(config: Any) -> bool:
    """Whether ``config`` is in the pruned format (``model_type`` ``moeprune_<family>``)."""
    model_type = _get(config, "model_type")
    return isinstance(model_type, str) and model_type.startswith(MODEL_TYPE_PREFIX)


def base_model_type(config: Any) -> str | None:
    """The stock model_type of a config, looking through hf_moeprune's pruned configs."""
    model_type = _get(config, "model_type")
    if is_pruned_config(config):
        return _get(config, "base_model_type") or model_type[len(MODEL_TYPE_PREFIX) :]
    return model_type


class PruningFields(NamedTuple):
    """Where a config keeps its pruning fields: the config itself, or a stock export's provenance dict."""

    fields: Mapping[str, Any] | Any
    stock_export: bool

    def get(self, name: str) -> Any:
        return _get(self.fields, name)


def pruning_fields(config: Any) -> PruningFields | None:
    """The pruning fields of a pruned-format config or a stock export's ``moeprune_provenance``; None when the
    config has neither (hf_moeprune did not prune it)."""
    if is_pruned_config(config):
        return PruningFields(config, False)
    provenance = _get(config, PROVENANCE_FIELD)
    if isinstance(provenance, Mapping):
        return PruningFields(provenance, True)
    return None


def _count_fields(config: Any) -> tuple[str, ...]:
    source = pruning_fields(config)
    recorded = source.get("expert_count_field") if source is not None else None
    return (recorded,) if recorded else COUNT_FIELD_CANDIDATES


def _moe_fields(config: Any) -> Any:
    """The (sub-)config holding the expert count: a vision-language model's ``text_config``."""
    source = pruning_fields(config)
    path = source.get("expert_config_path") if source is not None else None
    return _get(config, path) if path else config


def per_layer_expert_counts(config: Any) -> dict[int, int]:
    """Expert counts in transformers' own convention: ``{layer: count}`` for the layers whose ``per_layer_config``
    gives an expert-count field a value of their own, from a parsed ``config.json`` or a ``PreTrainedConfig``."""
    fields = _moe_fields(config)
    if not isinstance(fields, Mapping):
        names = _count_fields(config)
        return {k: v for name in names for k, v in per_layer_counts(fields, name).items()}
    overrides = fields.get("per_layer_config") or {}
    return {int(layer): values[name] for layer, values in overrides.items() for name in _count_fields(config)
            if name in values}  # fmt: skip


def _global_expert_count(config: Any) -> tuple[str, int] | None:
    fields = _moe_fields(config)
    if isinstance(fields, Mapping):
        found = [(name, fields[name]) for name in _count_fields(config) if fields.get(name) is not None]
        return found[0] if found else None
    for name in _count_fields(config):
        if name in (getattr(fields, "per_layer_attributes", None) or ()) or getattr(fields, name, None) is not None:
            return name, global_expert_count(fields, name)  # the default of every layer without an override
    return None


@dataclass(frozen=True)
class ExpertLayout:
    """Experts each decoder layer keeps, read from a saved config. ``None`` marks a dense layer."""

    family: str
    stock_export: bool
    original_num_experts: int
    experts_per_layer: tuple[int | None, ...]
    kept_expert_ids: tuple[tuple[int, ...] | None, ...]
    selection_bias: bool = False  # routers carry a learned load-balancing bias (aux-loss-free balancing)

    @property
    def uniform(self) -> bool:
        """Every MoE layer keeps the same number of experts."""
        return len({c for c in self.experts_per_layer if c is not None}) == 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.experts_per_layer) if c is not None]

    @property
    def kept_total(self) -> int:
        return sum(c for c in self.experts_per_layer if c is not None)

    @property
    def original_total(self) -> int:
        return self.original_num_experts * len(self.moe_layers)

    @property
    def sparsity(self) -> float:
        """Fraction of the routed experts removed, over all MoE layers."""
        return 1.0 - self.kept_total / self.original_total


def expert_layout(config: Any) -> ExpertLayout:
    """Read the per-layer expert counts from a config (pruned format or stock export with provenance)."""
    model_type = _get(config, "model_type")
    source = pruning_fields(config)
    declared = per_layer_expert_counts(config)
    if source is None and declared:
        return _layout_from_per_layer_config(config, declared)
    if source is None:
        raise ValueError(
            f"config of model_type {model_type!r} has neither the pruned-model fields (model_type "
            f"'{MODEL_TYPE_PREFIX}<family>' with experts_per_layer) nor '{PROVENANCE_FIELD}': "
            "it was not pruned by hf_moeprune, so there is no expert layout to describe"
        )
    stock = source.stock_export
    missing = [k for k in ("experts_per_layer", "kept_expert_ids", "original_num_experts") if source.get(k) is None]
    if missing:
        where = PROVENANCE_FIELD if stock else "config"
        raise ValueError(f"{where} of model_type {model_type!r} lacks {missing}")
    counts = list(source.get("experts_per_layer"))
    kept = list(source.get("kept_expert_ids"))
    if len(counts) != len(kept):
        raise ValueError(
            f"experts_per_layer has {len(counts)} entries but kept_expert_ids has {len(kept)}; they must match"
        )
    for layer, (count, ids) in enumerate(zip(counts, kept)):
        if (count is None) != (ids is None) or (count is not None and len(ids) != count):
            raise ValueError(f"layer {layer}: experts_per_layer={count} disagrees with kept_expert_ids={ids}")
    if all(c is None for c in counts):
        raise ValueError("experts_per_layer lists no MoE layer")
    for layer, count in declared.items():  # transformers' convention must say the same
        if layer >= len(counts) or counts[layer] != count:
            raise ValueError(
                f"layer {layer}: per_layer_config gives {count} experts but experts_per_layer gives "
                f"{counts[layer] if layer < len(counts) else 'no entry'}"
            )
    # a stock export's family is its own model_type unless the provenance names it
    family = source.get("base_model_type") or (base_model_type(config) if not stock else model_type)
    return ExpertLayout(
        family=str(family),
        stock_export=stock,
        original_num_experts=int(source.get("original_num_experts")),
        experts_per_layer=tuple(counts),
        kept_expert_ids=tuple(tuple(ids) if ids is not None else None for ids in kept),
        selection_bias=bool(_get(config, "selection_bias_routing")),
    )


def _layout_from_per_layer_config(config: Any, declared: dict[int, int]) -> ExpertLayout:
    """The layout a config states only in transformers' convention (no hf_moeprune fields): every layer has the global
    count unless ``per_layer_config`` overrides it. Such a config records neither dense layers nor which original
    experts a layer kept, so each layer is read as MoE and its experts as ids ``0..n-1``."""
    fields = _moe_fields(config)
    name, widest = _global_expert_count(config) or (None, None)
    if widest is None:
        raise ValueError(f"per_layer_config gives expert counts {declared} but the config has no global count")
    layers = int(_get(fields, "num_hidden_layers"))
    counts = [int(declared.get(i, widest)) for i in range(layers)]
    return ExpertLayout(
        family=str(_get(config, "model_type")),
        stock_export=True,
        original_num_experts=max(int(widest), *counts),
        experts_per_layer=tuple(counts),
        kept_expert_ids=tuple(tuple(range(c)) for c in counts),
    )


def pruned_layout(config: Any) -> ExpertLayout | None:
    """The expert layout when hf_moeprune removed experts, None for a model that keeps them all (e.g. one
    that was only quantized or distilled: its card then has no pruning section)."""
    if pruning_fields(config) is None:
        return None
    layout = expert_layout(config)
    return layout if layout.kept_total < layout.original_total or layout.selection_bias else None


def saved_kept_expert_ids(config: Any) -> list | None:
    """``kept_expert_ids`` as a saved config records them (pruned format or stock provenance), else None."""
    source = pruning_fields(config)
    return source.get("kept_expert_ids") if source is not None else None
