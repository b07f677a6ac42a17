"""Post-hoc (one-shot) expert pruning: measure statistics on calibration data, score, allocate, remove.

The same statistics, criteria and allocation as ``MoEPruneTrainer``, without training: REAP one-shot
(arXiv 2510.13999) is ``prune_oneshot(model, batches, criterion="reap")``, frequency pruning
``criterion="frequency"``. Saliency needs gradients and is computed from the causal-LM loss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_moeprune.adapters import get_adapter
from hf_moeprune.pruning.allocation import AllocationSpec, allocate, select_experts
from hf_moeprune.pruning.budgets import layer_budgets
from hf_moeprune.pruning.criteria import get_criterion
from hf_moeprune.pruning.statistics import ExpertStatistics, LayerStats
from hf_moeprune.surgery import prune_experts, unwrap_model
from hf_moeprune.training.instrumentation import RoutingInstrumentation

logger = logging.getLogger(__name__)


def collect_statistics(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], saliency: bool = False, progress: bool = True
) -> dict[int, LayerStats]:
    """Expert statistics (tokens, probability mass, REAP, optionally saliency) summed over ``batches``."""
    model = unwrap_model(model)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    stats = ExpertStatistics({i: adapter.num_experts(layers[i]) for i in adapter.moe_layer_indices(model)})
    inst = RoutingInstrumentation(model, adapter, stats)
    inst.attach()
    was_training = model.training
    model.train()  # the experts wrapper records REAP on the training path; these models have no dropout by default
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="collecting expert statistics", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            inst.token_mask = batch.get("attention_mask")
            inst.recording = True
            with torch.set_grad_enabled(saliency):
                out = model(**batch, labels=batch["input_ids"] if saliency else None)
            inst.recording = False
            if saliency:
                out.loss.backward()
                inst.accumulate_saliency()
                model.zero_grad(set_to_none=True)
    finally:
        inst.detach()
        model.train(was_training)
    stats.end_step()
    return stats.snapshot()


def plan_oneshot(
    model: nn.Module,
    stats: dict[int, LayerStats],
    criterion: str,
    target: float,
    allocation: str = "uniform",
    min_experts: int | None = None,
    multiple_of: int = 1,
    scores: dict[int, torch.Tensor] | None = None,
) -> dict[int, list[int]]:
    """Positions to keep per layer so that ``target`` of all routed experts go (``scores`` overrides the
    criterion, e.g. random scores for a baseline)."""
    model = unwrap_model(model)
    adapter = get_adapter(model)
    budgets = {
        layer: b for layer, b in layer_budgets(model, adapter, min_experts, multiple_of).items() if layer in stats
    }
    if scores is None:
        scores = {layer: get_criterion(criterion)(s) for layer, s in stats.items()}
    loads = {layer: s.tokens for layer, s in stats.items()}
    counts = allocate(budgets, target, AllocationSpec(allocation), scores, loads)
    return {
        layer: select_experts(scores[layer], count, budgets[layer].groups)
        for layer, count in counts.items()
        if count < budgets[layer].current
    }


def prune_oneshot(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    criterion: str = "reap",
    target: float = 0.5,
    allocation: str = "uniform",
    **kwargs,
) -> dict[int, list[int]]:
    """Collect statistics on ``batches``, then remove ``target`` of the routed experts; returns the plan applied."""
    stats = collect_statistics(model, batches, saliency=criterion == "saliency")
    plan = plan_oneshot(model, stats, criterion, target, allocation, **kwargs)
    if plan:
        prune_experts(model, plan)
    logger.info(
        "one-shot %s pruning: experts per layer %s", criterion, getattr(model.config, "experts_per_layer", None)
    )
    return plan
