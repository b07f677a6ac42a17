"""Allocation: how many experts each layer keeps, and which ones. Pure functions on tensors.

Three modes:
- ``uniform``: every layer loses the same fraction of its original experts.
- ``global``: layer-adaptive by importance; experts are compared across layers by their score relative to
  their layer's mean score, and the globally least important go first. Layers whose load is concentrated
  on a few experts have many far-below-mean experts and so lose more.
- ``laep``: Yuan3.0 Ultra's layer-adaptive expert pruning (arXiv 2601.14327). In each layer an expert whose
  load is below ``alpha`` x the layer's mean load is a candidate; the lowest-load candidates whose
  cumulative load share stays within ``beta`` may be removed. ``beta`` is then searched (bisection) so that
  the global target is met; if even ``beta = 1`` cannot reach it, the remainder is filled with ``global``.

Layers that must keep all their experts (``LayerBudget.keep_all``: DeepSeek-V4's hash-routed layers) count towards
the target (a fraction of all routed experts) but never lose one: every mode spends the whole target on the other
layers (``uniform`` raises their common fraction accordingly).

Every mode respects each layer's floor, keeps counts a multiple of ``multiple_of`` (so they split evenly
over expert-parallel ranks) and, for group-limited routing, a multiple of the group count with the same
number kept in every group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ALLOCATION_MODES = ("uniform", "global", "laep")


@dataclass(frozen=True)
class LayerBudget:
    """What allocation needs to know about one MoE layer."""

    original: int  # experts in the unpruned checkpoint
    current: int  # experts now
    floor: int  # fewest experts the layer may keep
    multiple_of: int = 1  # kept counts must be a multiple of this (includes the group count)
    groups: int = 1
    # the layer must keep all its experts (MoEAdapter.keep_all_experts): it counts towards the target, but only the
    # other layers lose experts
    keep_all: bool = False

    def __post_init__(self):
        if self.current > self.original or self.current < 1:
            raise ValueError(f"current={self.current} must be in [1, original={self.original}]")
        if self.multiple_of < 1 or self.groups < 1 or self.multiple_of % self.groups:
            raise ValueError(f"multiple_of={self.multiple_of} must be a positive multiple of groups={self.groups}")
        if self.keep_all and self.current != self.original:
            raise ValueError(
                f"keep_all=True but current={self.current} != original={self.original}: a layer that must keep all "
                f"its experts has lost some"
            )

    @property
    def lowest(self) -> int:
        """Smallest allowed count: the floor rounded up to a multiple; never above the current count (the current
        count for a keep-all layer)."""
        if self.keep_all:
            return self.current
        m = self.multiple_of
        return min(self.current, math.ceil(self.floor / m) * m)

    def allowed(self, count: int) -> int:
        """The allowed count closest to ``count`` from above (never removes more than asked)."""
        m = self.multiple_of
        rounded = math.ceil(count / m) * m
        return max(self.lowest, min(self.current, rounded))


@dataclass(frozen=True)
class AllocationSpec:
    mode: str = "uniform"
    laep_alpha: float = 1.0
    laep_beta: float = 0.1

    def __post_init__(self):
        if self.mode not in ALLOCATION_MODES:
            raise ValueError(f"allocation mode {self.mode!r}; known: {list(ALLOCATION_MODES)}")
        if self.laep_alpha <= 0:
            raise ValueError(f"laep_alpha={self.laep_alpha} must be > 0")
        if not 0 <= self.laep_beta <= 1:
            raise ValueError(f"laep_beta={self.laep_beta} must be in [0, 1]")


def removal_needed(budgets: dict[int, LayerBudget], fraction: float) -> int:
    """Experts still to remove so that ``fraction`` of all original routed experts are gone."""
    original = sum(b.original for b in budgets.values())
    current = sum(b.current for b in budgets.values())
    return max(0, round(fraction * original) - (original - current))


def _uniform(budgets: dict[int, LayerBudget], fraction: float) -> dict[int, int]:
    """Every layer loses the same fraction of its original experts; keep-all layers lose none, so the others lose
    ``fraction`` x (all original experts) / (their original experts) each, for the same total."""
    prunable = sum(b.original for b in budgets.values() if not b.keep_all)
    if prunable == 0:
        return {layer: b.current for layer, b in budgets.items()}
    total = sum(b.original for b in budgets.values())
    fraction = fraction * total / prunable if prunable != total else fraction
    return {layer: b.allowed(round(b.original * (1.0 - fraction))) for layer, b in budgets.items()}


def _relative(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.double().mean()
    return scores.double() / mean if mean > 0 else torch.zeros_like(scores, dtype=torch.float64)


def _global(
    budgets: dict[int, LayerBudget], scores: dict[int, torch.Tensor], needed: int, start: dict[int, int]
) -> dict[int, int]:
    """Greedy: repeatedly remove the cheapest chunk of ``multiple_of`` experts (cost = their relative scores)."""
    keep = dict(start)
    ordered = {layer: torch.sort(_relative(scores[layer])).values for layer in budgets}
    removed = sum(budgets[layer].current - keep[layer] for layer in budgets)
    while removed < needed:
        best, best_cost = None, math.inf
        for layer, b in budgets.items():
            m = b.multiple_of
            if keep[layer] - m < b.lowest:
                continue
            # experts removed so far in this layer are the lowest-scored ones; the next chunk follows them
            gone = b.current - keep[layer]
            cost = float(ordered[layer][gone : gone + m].sum()) / m
            if cost < best_cost:
                best, best_cost = layer, cost
        if best is None:
            break
        m = budgets[best].multiple_of
        if removed + m > needed and (removed + m - needed) > (needed - removed):
            break  # overshooting would miss the target by more than stopping here
        keep[best] -= m
        removed += m
    return keep


def _laep_counts(budgets: dict[int, LayerBudget], loads: dict[int, torch.Tensor], alpha: float, beta: float):
    keep = {}
    for layer, b in budgets.items():
        load = loads[layer].double()
        total = load.sum()
        share = load / total if total > 0 else torch.full_like(load, 1.0 / load.numel())
        candidates = torch.nonzero(share < alpha * share.mean()).flatten()
        order = candidates[torch.argsort(share[candidates], stable=True)]
        cumulative = torch.cumsum(share[order], 0)
        removable = int((cumulative <= beta + 1e-12).sum())
        m = b.multiple_of
        removable = (removable // m) * m
        keep[layer] = max(b.lowest, b.current - removable)
    return keep


def _laep(
    budgets: dict[int, LayerBudget],
    loads: dict[int, torch.Tensor],
    scores: dict[int, torch.Tensor],
    needed: int,
    spec: AllocationSpec,
) -> dict[int, int]:
    def removed(keep):
        return sum(budgets[layer].current - keep[layer] for layer in budgets)

    keep = _laep_counts(budgets, loads, spec.laep_alpha, spec.laep_beta)
    if removed(keep) != needed:
        lo, hi = 0.0, 1.0
        best = _laep_counts(budgets, loads, spec.laep_alpha, hi)
        if removed(best) >= needed:
            # smallest beta that reaches the target: never removes more than the rule needs to
            for _ in range(40):
                mid = (lo + hi) / 2
                candidate = _laep_counts(budgets, loads, spec.laep_alpha, mid)
                if removed(candidate) >= needed:
                    hi, best = mid, candidate
                else:
                    lo = mid
            keep = best
        else:
            logger.warning(
                "LAEP (alpha=%s) can remove at most %d experts, target needs %d; filling the rest by relative score",
                spec.laep_alpha,
                removed(best),
                needed,
            )
            keep = _global(budgets, scores, needed, best)
    if removed(keep) > needed:
        keep = _trim_overshoot(budgets, scores, keep, removed(keep) - needed)
    return keep


def _trim_overshoot(budgets, scores, keep, excess: int) -> dict[int, int]:
    """Give back whole chunks to the layers whose next removed expert matters most."""
    keep = dict(keep)
    ordered = {layer: torch.sort(_relative(scores[layer])).values for layer in budgets}
    while excess > 0:
        best, best_value = None, -math.inf
        for layer, b in budgets.items():
            m = b.multiple_of
            gone = b.current - keep[layer]
            if gone < m or m > excess:
                continue
            value = float(ordered[layer][gone - m : gone].sum()) / m
            if value > best_value:
                best, best_value = layer, value
        if best is None:
            break
        keep[best] += budgets[best].multiple_of
        excess -= budgets[best].multiple_of
    return keep


def allocate(
    budgets: dict[int, LayerBudget],
    fraction: float,
    spec: AllocationSpec,
    scores: dict[int, torch.Tensor],
    loads: dict[int, torch.Tensor] | None = None,
) -> dict[int, int]:
    """Experts each layer keeps so that ``fraction`` of all original routed experts are removed.

    ``scores`` (criterion output, higher = more important) and ``loads`` (tokens routed) are per layer,
    aligned with the layer's current experts. Counts never grow back.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction={fraction} must be in [0, 1)")
    for layer, b in budgets.items():
        if scores[layer].numel() != b.current:
            raise ValueError(f"layer {layer}: {scores[layer].numel()} scores for {b.current} experts")
    if spec.mode == "uniform":
        return _uniform(budgets, fraction)
    needed = removal_needed(budgets, fraction)
    current = {layer: b.current for layer, b in budgets.items()}
    if needed == 0:
        return current
    if spec.mode == "global":
        return _global(budgets, scores, needed, current)
    return _laep(budgets, loads if loads is not None else scores, scores, needed, spec)


def select_experts(scores: torch.Tensor, keep: int, groups: int = 1) -> list[int]:
    """Positions of the ``keep`` highest-scoring experts, ascending; with groups, ``keep / groups`` per
    contiguous group, so group-limited routing keeps its structure. Ties go to the lower index."""
    n = scores.numel()
    if keep > n or keep < 1:
        raise ValueError(f"cannot keep {keep} of {n} experts")
    if n % groups or keep % groups:
        raise ValueError(f"{n} experts / keep {keep} must both divide into {groups} groups")
    size, per_group = n // groups, keep // groups
    kept = []
    for g in range(groups):
        block = scores[g * size : (g + 1) * size].double()
        # stable descending sort: equal scores keep index order
        order = torch.argsort(-block, stable=True)[:per_group]
        kept.extend(int(i) + g * size for i in order)
    return sorted(kept)
