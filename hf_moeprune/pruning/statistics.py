"""Per-layer, per-expert statistics accumulated over training steps.

Quantities (each a float tensor [experts] per MoE layer):
- ``tokens``: tokens routed to the expert (routing frequency);
- ``prob_mass``: router probability mass the expert received (softmax/sigmoid scores summed over tokens);
- ``reap_sum``: sum over routed tokens of gate weight x L2 norm of the expert's output (REAP numerator);
- ``saliency``: first-order Taylor importance |theta . grad| of the expert's parameters, per optimizer step;
- ``ean_sum``: sum over routed tokens of the L2 norm of the expert's output, without the gate weight (EAN, the
  expert activation norm of "Finding Fantastic Experts in MoEs", a REAP baseline); recorded with ``reap_sum``;
- ``reap_tokens``: tokens routed to the expert on the steps where ``reap_sum`` was recorded (REAP's denominator;
  equal to ``tokens`` unless REAP is recorded on every N-th step only, ``prune_reap_interval``).

Accumulation is either a sliding window of the last ``window`` steps or an exponential decay per step
(``decay`` = 1 keeps a plain running sum). Everything here is linear in the per-step values, so the sum
over processes of the local accumulators equals the accumulator of the summed values: processes keep
local state and only the snapshot used for a decision is reduced (see ``snapshot``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

STAT_NAMES = ("tokens", "prob_mass", "reap_sum", "saliency", "reap_tokens", "ean_sum")


@dataclass(frozen=True)
class LayerStats:
    """Accumulated statistics of one layer (tensors of shape [experts])."""

    tokens: torch.Tensor
    prob_mass: torch.Tensor
    reap_sum: torch.Tensor
    saliency: torch.Tensor
    reap_tokens: torch.Tensor | None = None  # None: REAP was recorded on every step (denominator = tokens)
    ean_sum: torch.Tensor | None = None  # None: statistics from before EAN was recorded

    @property
    def num_experts(self) -> int:
        return self.tokens.numel()

    @property
    def load_share(self) -> torch.Tensor:
        total = self.tokens.sum()
        return self.tokens / total if total > 0 else torch.full_like(self.tokens, 1.0 / max(self.num_experts, 1))


class ExpertStatistics:
    """Accumulates expert statistics for a set of MoE layers with possibly different expert counts."""

    def __init__(self, experts_per_layer: dict[int, int], window: int = 0, decay: float = 1.0):
        if window < 0:
            raise ValueError(f"window={window} must be >= 0 (0 means exponential decay instead of a window)")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay={decay} must be in (0, 1]")
        self.window = window
        self.decay = decay
        self.steps = 0
        self._step = {layer: self._zeros(n) for layer, n in experts_per_layer.items()}
        self._acc = {layer: self._zeros(n) for layer, n in experts_per_layer.items()}
        self._history: deque[dict[int, dict[str, torch.Tensor]]] = deque(maxlen=window or None)

    @staticmethod
    def _zeros(n: int) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(n, dtype=torch.float64) for name in STAT_NAMES}

    @property
    def layers(self) -> list[int]:
        return sorted(self._acc)

    def add(self, layer: int, name: str, values: torch.Tensor) -> None:
        """Add per-expert values of the current step (summed into that step's bucket)."""
        bucket = self._step[layer][name]
        if values.shape != bucket.shape:
            raise ValueError(f"layer {layer}: {name} has shape {tuple(values.shape)}, expected {tuple(bucket.shape)}")
        bucket += values.detach().to(device=bucket.device, dtype=bucket.dtype)

    def end_step(self) -> None:
        """Close the current optimizer step: fold its values into the window or the decayed sums."""
        if self.window:
            self._history.append(self._step)
            self._acc = {
                layer: {name: sum(h[layer][name] for h in self._history) for name in STAT_NAMES} for layer in self._acc
            }
        else:
            for layer, stats in self._acc.items():
                for name in STAT_NAMES:
                    stats[name].mul_(self.decay).add_(self._step[layer][name])
        self._step = {layer: self._zeros(stats["tokens"].numel()) for layer, stats in self._acc.items()}
        self.steps += 1

    def snapshot(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[int, LayerStats]:
        """Accumulated statistics per layer; ``reduce`` (e.g. a sum over processes) is applied to one flat
        tensor so that every process receives identical values in a single collective."""
        layers = self.layers
        flat = torch.cat([self._acc[layer][name] for layer in layers for name in STAT_NAMES])
        if reduce is not None:
            flat = reduce(flat.clone())
        out, offset = {}, 0
        for layer in layers:
            n = self._acc[layer]["tokens"].numel()
            values = {}
            for name in STAT_NAMES:
                values[name] = flat[offset : offset + n].clone()
                offset += n
            out[layer] = LayerStats(**values)
        return out

    def select(self, layer: int, index: torch.Tensor) -> None:
        """Follow expert surgery: keep (and reorder) the rows ``index`` of ``layer``."""
        index = index.to(torch.long)
        for store in [self._acc, self._step, *self._history]:
            for name in STAT_NAMES:
                store[layer][name] = store[layer][name].index_select(0, index)

    def state_dict(self) -> dict:
        return {
            "window": self.window,
            "decay": self.decay,
            "steps": self.steps,
            "acc": self._acc,
            "step": self._step,
            "history": list(self._history),
        }

    def load_state_dict(self, state: dict) -> None:
        self.window, self.decay, self.steps = state["window"], state["decay"], state["steps"]
        self._acc, self._step = state["acc"], state["step"]
        self._history = deque(state["history"], maxlen=self.window or None)
        for store in [self._acc, self._step, *self._history]:  # states saved before reap_tokens/ean_sum existed
            for stats in store.values():
                stats.setdefault("reap_tokens", stats["tokens"].clone())
                stats.setdefault("ean_sum", torch.zeros_like(stats["tokens"]))
