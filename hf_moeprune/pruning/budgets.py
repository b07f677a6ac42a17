"""Per-layer pruning budgets read off a model: how many experts each MoE layer has, had, and must keep."""

from __future__ import annotations

import math

from torch import nn

from hf_moeprune.adapters import MoEAdapter
from hf_moeprune.pruning.allocation import LayerBudget


def layer_budgets(
    model: nn.Module, adapter: MoEAdapter, min_experts: int | None = None, multiple_of: int = 1
) -> dict[int, LayerBudget]:
    """One ``LayerBudget`` per MoE layer. The floor is at least top-k; with group-limited routing every group
    keeps the experts its group score is made of (``adapter.group_score_experts``: 2 for DeepSeek-V3, which sums
    each group's top-2) and the chosen groups hold >= top-k; counts stay a multiple of ``multiple_of`` and of the
    group count. Layers that must keep all their experts (``adapter.keep_all_experts``) get ``keep_all`` budgets:
    they count towards the target and never lose an expert."""
    config = model.config
    top_k = adapter.top_k(config)
    groups = adapter.num_groups(config)
    floor = max(min_experts or top_k, top_k)
    if groups > 1:
        topk_group = int(getattr(adapter.moe_config(config), adapter.topk_group_field) or groups)
        floor = max(floor, adapter.group_score_experts * groups, math.ceil(top_k / topk_group) * groups)
    multiple = math.lcm(multiple_of, groups)
    layers = adapter.decoder_layers(model)
    original = getattr(config, "original_num_experts", None)
    fixed = adapter.keep_all_layers(config)
    budgets = {}
    for idx in adapter.moe_layer_indices(model):
        current = adapter.num_experts(layers[idx])
        if idx in fixed:  # all its experts stay: it has them all, whatever the other layers' original count
            budgets[idx] = LayerBudget(current, current, current, 1, 1, keep_all=True)
            continue
        budgets[idx] = LayerBudget(max(original or current, current), current, floor, multiple, groups)
    return budgets
