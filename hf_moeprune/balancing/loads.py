"""Measure per-expert routing loads of a model on calibration data, and rebalance a model for expert parallelism."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_moeprune.adapters import get_adapter
from hf_moeprune.balancing.placement import PlacementPlan, plan_placement
from hf_moeprune.surgery import TensorReplacedHook, permute_experts, unwrap_model

logger = logging.getLogger(__name__)


@torch.no_grad()
def measure_expert_loads(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert, per MoE layer, over ``batches`` (padding excluded via attention_mask).

    ``reduce`` (e.g. ``lambda t: accelerator.reduce(t, "sum")``) sums the counts over processes so every rank
    gets the same loads and hence the same placement plan.
    """
    model = unwrap_model(model)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    moe = adapter.moe_layer_indices(model)
    counts = {i: torch.zeros(adapter.num_experts(layers[i]), dtype=torch.float64) for i in moe}
    mask: list[torch.Tensor | None] = [None]

    def hook(layer):
        def record(module, args, output):
            indices = output[2]
            weights = None
            if mask[0] is not None and mask[0].numel() == indices.shape[0]:
                weights = mask[0].reshape(-1).float().repeat_interleave(indices.shape[-1]).to(indices.device)
            counts[layer] += (
                torch.bincount(indices.reshape(-1), weights=weights, minlength=counts[layer].numel()).cpu().double()
            )

        return record

    handles = [adapter.router(layers[i]).register_forward_hook(hook(i)) for i in moe]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="measuring expert loads", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            mask[0] = batch.get("attention_mask")
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if reduce is not None:
        flat = reduce(torch.cat([counts[i] for i in moe]))
        offset = 0
        for i in moe:
            n = counts[i].numel()
            counts[i] = flat[offset : offset + n].double().cpu()
            offset += n
    return counts


def rebalance_for_expert_parallel(
    model: nn.Module,
    loads: dict[int, torch.Tensor],
    ep_size: int,
    num_redundant: int = 0,
    on_tensor_replaced: TensorReplacedHook | None = None,
) -> PlacementPlan:
    """Plan a load-balanced placement and apply its order with ``permute_experts`` (outputs unchanged)."""
    model = unwrap_model(model)
    adapter = get_adapter(model)
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
