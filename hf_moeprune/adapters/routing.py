"""Family routing rules as pure functions of (router module, router logits, selection bias).

Each function reproduces its family's router exactly from the logits (tests check bit equality with the
stock router) and additionally accepts a per-expert ``selection_bias`` that is added to the scores used
to *choose* experts but not to the combine weights. That one mechanism serves:
- aux-loss-free load balancing (DeepSeek-V3's rule: select on score + b, weight with the raw score);
- soft masking before removal (a ``-inf`` entry means "never select this expert").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

RouteFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]

ROUTE_FUNCTIONS: dict[str, RouteFunction] = {}


def register_route_function(name: str):
    def decorator(fn: RouteFunction) -> RouteFunction:
        if name in ROUTE_FUNCTIONS:
            raise ValueError(f"route function {name!r} is already registered")
        ROUTE_FUNCTIONS[name] = fn
        return fn

    return decorator


def _select(scores: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None) -> torch.Tensor:
    choice = scores if selection_bias is None else scores + selection_bias.to(scores.dtype)
    return torch.topk(choice, top_k, dim=-1).indices


@register_route_function("softmax_topk_renorm")
def softmax_topk_renorm(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Mixtral: softmax over all experts, top-k, renormalise over the chosen k (weights stay fp32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    indices = _select(probs, router.top_k, selection_bias)
    weights = probs.gather(-1, indices)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights, indices


@register_route_function("softmax_topk")
def softmax_topk(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Qwen2/3-MoE, OLMoE: softmax over all experts, top-k, renormalise only with ``norm_topk_prob``."""
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    indices = _select(probs, router.top_k, selection_bias)
    weights = probs.gather(-1, indices)
    if router.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


@register_route_function("topk_softmax")
def topk_softmax(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """GPT-OSS: top-k on the (biased) logits, softmax over the chosen k only."""
    indices = _select(logits, router.top_k, selection_bias)
    values = logits.gather(-1, indices)
    return torch.softmax(values, dim=1, dtype=values.dtype), indices


@register_route_function("sigmoid_group_limited")
def sigmoid_group_limited(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """DeepSeek-V3: sigmoid scores + e_score_correction_bias, best ``topk_group`` groups, top-k inside them."""
    scores = logits.sigmoid()
    choice = scores + router.e_score_correction_bias
    if selection_bias is not None:
        choice = choice + selection_bias.to(choice.dtype)
    groups, num_experts = router.num_group, router.num_experts
    group_scores = choice.view(-1, groups, num_experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, groups, num_experts // groups).reshape(-1, num_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if router.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * router.routed_scaling_factor, indices


def get_route_function(name: str) -> RouteFunction:
    try:
        return ROUTE_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown route function {name!r}; known: {sorted(ROUTE_FUNCTIONS)}") from None
