"""Router load balancing during training: pure functions of router logits and expert loads.

- Switch auxiliary loss (per layer, any expert counts): see ``heterogeneous_load_balancing_loss``.
- Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps logits small and routing stable.
- Aux-loss-free bias balancing (DeepSeek-V3): experts are *selected* on score + b; after each step
  b_i -= gamma if expert i is overloaded, += gamma if underloaded (relative to the layer's mean load).
- MaxVio (the imbalance metric DeepSeek reports): max load / mean load - 1.
"""

from __future__ import annotations

import torch

from hf_moeprune.format.modeling_moeprune import heterogeneous_load_balancing_loss

__all__ = ["bias_update", "heterogeneous_load_balancing_loss", "max_violation", "router_z_loss"]


def router_z_loss(router_logits, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers of the mean over (unpadded) tokens of logsumexp(logits)^2."""
    if isinstance(router_logits, dict):
        router_logits = list(router_logits.values())
    losses = []
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1) ** 2
        if attention_mask is not None and attention_mask.numel() == z.numel():
            weight = attention_mask.reshape(-1).to(z.dtype)
            losses.append((z * weight).sum() / weight.sum().clamp_min(1.0))
        else:
            losses.append(z.mean())
    return torch.stack(losses).mean()


def bias_update(bias: torch.Tensor, loads: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's aux-loss-free rule: a new bias, nudged by ``rate`` towards balance.

    Overloaded experts (load above the layer mean) get ``-rate``, underloaded ones ``+rate``; exactly
    average ones are left alone. ``loads`` are token counts for the step (summed over processes).
    """
    if bias.shape != loads.shape:
        raise ValueError(f"bias has shape {tuple(bias.shape)} but loads {tuple(loads.shape)}")
    loads = loads.to(device=bias.device, dtype=torch.float64)
    return bias - rate * torch.sign(loads - loads.mean()).to(bias.dtype)


def max_violation(loads: torch.Tensor) -> float:
    """MaxVio = max load / mean load - 1 (0 when perfectly balanced; 0 for a layer with no tokens)."""
    loads = loads.double()
    mean = loads.mean()
    return float(loads.max() / mean - 1.0) if mean > 0 else 0.0
