"""Measure per-expert routing loads of a model on calibration data, and rebalance a model for expert parallelism."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from hf_moeprune.adapters import get_adapter
from hf_moeprune.balancing.placement import PlacementPlan, plan_placement
from hf_moeprune.observation import observe_routing
from hf_moeprune.surgery import TensorReplacedHook, permute_experts, unwrap_model

logger = logging.getLogger(__name__)


@torch.no_grad()
def measure_expert_loads(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert (float64), per MoE layer, over ``batches`` (padding excluded via
    attention_mask), as the routers choose them (``hf_moeprune.observation``).

    ``reduce`` (e.g. ``lambda t: accelerator.reduce(t, "sum")``) sums the counts over processes so every rank
    gets the same loads and hence the same placement plan.
    """
    stats = observe_routing(model, batches, record_reap=False, progress=progress, desc="measuring expert loads")
    return {layer: s.tokens.double().cpu() for layer, s in stats.snapshot(reduce).items()}


def rebalance_for_expert_parallel(
    model: nn.Module,
    loads: dict[int, torch.Tensor],
    ep_size: int,
    num_redundant: int = 0,
    on_tensor_replaced: TensorReplacedHook | None = None,
) -> PlacementPlan:
    """Plan a load-balanced placement and apply its order with ``permute_experts`` (outputs unchanged). Layers that must
    keep all their experts in order (``MoEAdapter.keep_all_experts``) are left out of the plan."""
    model = unwrap_model(model)
    adapter = get_adapter(model)
    fixed = adapter.keep_all_layers(model.config)  # their experts stay in checkpoint order (permute_experts refuses)
    loads = {layer: load for layer, load in loads.items() if layer not in fixed}
    plan = plan_placement(loads, ep_size, num_redundant=num_redundant, num_groups=adapter.num_groups(model.config))
    orders = plan.orders_by_layer()
    if orders:
        permute_experts(model, orders, on_tensor_replaced=on_tensor_replaced)
    summary = plan.summary()
    logger.info(
        "placement for ep_size=%d: mean balancedness %.3f -> %.3f", ep_size,
        summary["mean_balancedness_before"] or float("nan"), summary["mean_balancedness_after"] or float("nan"),
    )  # fmt: skip
    return plan
