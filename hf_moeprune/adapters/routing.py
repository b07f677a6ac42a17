"""Family routing rules as pure functions of (router module, router logits, selection bias).

Each function reproduces its family's router exactly from the logits (tests check bit equality with the
stock router) and additionally accepts a per-expert ``selection_bias`` that is added to the scores used
to *choose* experts but not to the combine weights. That one mechanism serves:
- aux-loss-free load balancing (DeepSeek-V3's rule: select on score + b, weight with the raw score);
- soft masking before removal (a ``-inf`` entry means "never select this expert").

The functions themselves live in the self-contained ``format/modeling_moeprune.py``, because a pruned model
loaded with ``trust_remote_code`` applies its saved selection bias with them; this module is their registry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hf_moeprune.format.modeling_moeprune import (
    BUILTIN_ROUTE_FUNCTIONS,
    ROUTE_FUNCTIONS,
    sigmoid_group_limited,
    softmax_topk,
    softmax_topk_renorm,
    softmax_topk_scaled,
    topk_softmax,
)

RouteFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "BUILTIN_ROUTE_FUNCTIONS",
    "ROUTE_FUNCTIONS",
    "RouteFunction",
    "get_route_function",
    "register_route_function",
    "sigmoid_group_limited",
    "softmax_topk",
    "softmax_topk_renorm",
    "softmax_topk_scaled",
    "topk_softmax",
]


def register_route_function(name: str):
    """Register a routing rule at run time (experiments, statistics). `register_family` accepts only the rules
    defined in ``format/modeling_moeprune.py``: a model saved with a selection bias applies its rule at load
    time, also under ``trust_remote_code`` where only that file is available."""

    def decorator(fn: RouteFunction) -> RouteFunction:
        if name in ROUTE_FUNCTIONS:
            raise ValueError(f"route function {name!r} is already registered")
        ROUTE_FUNCTIONS[name] = fn
        return fn

    return decorator


def get_route_function(name: str) -> RouteFunction:
    try:
        return ROUTE_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown route function {name!r}; known: {sorted(ROUTE_FUNCTIONS)}") from None
