"""Pruning criteria: pure functions from a layer's statistics to one importance score per expert.

Higher score = more important. Criteria are registered by name; ``MoEPruneArguments.prune_criterion``
picks one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_moeprune.pruning.statistics import LayerStats

Criterion = Callable[[LayerStats], torch.Tensor]

CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str):
    def decorator(fn: Criterion) -> Criterion:
        if name in CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        CRITERIA[name] = fn
        return fn

    return decorator


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown prune_criterion {name!r}; known: {sorted(CRITERIA)}") from None


@register_criterion("frequency")
def frequency(stats: LayerStats) -> torch.Tensor:
    """Tokens routed to the expert."""
    return stats.tokens.clone()


@register_criterion("prob_mass")
def prob_mass(stats: LayerStats) -> torch.Tensor:
    """Router probability mass: soft usage, also informative for experts just below the top-k cut."""
    return stats.prob_mass.clone()


@register_criterion("reap")
def reap(stats: LayerStats) -> torch.Tensor:
    """REAP (arXiv 2510.13999): mean over routed tokens of gate weight x ||expert output||; 0 if never routed."""
    tokens = _reap_tokens(stats)
    return torch.where(tokens > 0, stats.reap_sum / tokens.clamp_min(1.0), torch.zeros_like(tokens))


@register_criterion("reap_frequency")
def reap_frequency(stats: LayerStats) -> torch.Tensor:
    """Total router-weighted output norm: REAP's numerator, i.e. REAP x frequency (the expert's total contribution)."""
    tokens = _reap_tokens(stats)
    if torch.equal(tokens, stats.tokens):
        return stats.reap_sum.clone()
    # REAP recorded on some steps only: scale its mean by the tokens of every step
    return reap(stats) * stats.tokens


def _reap_tokens(stats: LayerStats) -> torch.Tensor:
    """Tokens counted on the steps where REAP was recorded (all steps unless ``prune_reap_interval`` > 1)."""
    return stats.tokens if stats.reap_tokens is None else stats.reap_tokens


@register_criterion("ean")
def ean(stats: LayerStats) -> torch.Tensor:
    """EAN (expert activation norm; Jaiswal et al. 2025, a baseline in the REAP paper): sum over routed tokens of
    ||expert output||, without the gate weight."""
    if stats.ean_sum is None:
        raise ValueError("these statistics carry no ean_sum (recorded before EAN existed); collect them again")
    return stats.ean_sum.clone()


@register_criterion("saliency")
def saliency(stats: LayerStats) -> torch.Tensor:
    """First-order Taylor estimate of the loss change when the expert is removed: |theta . grad|."""
    return stats.saliency.clone()


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors (ties broken by index, deterministic)."""
    if a.numel() != b.numel():
        raise ValueError(f"cannot correlate scores of {a.numel()} and {b.numel()} experts")
    n = a.numel()
    if n < 2:
        return 1.0
    ra = torch.empty(n, dtype=torch.float64)
    rb = torch.empty(n, dtype=torch.float64)
    ra[torch.argsort(a.double(), stable=True)] = torch.arange(n, dtype=torch.float64)
    rb[torch.argsort(b.double(), stable=True)] = torch.arange(n, dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
