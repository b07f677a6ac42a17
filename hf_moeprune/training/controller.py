"""The pruning controller: turns statistics into decisions at each optimizer step, and keeps its state.

It never touches the model itself; the trainer applies what it returns (surgery, masks). Decisions depend
only on reduced statistics and reduced losses, so every process takes the same ones.

Selective expansion (soft masking with a grace period), the rule:
1. When the schedule asks for removals and ``prune_grace_steps > 0``, the chosen experts are first masked:
   the router can no longer select them, but their weights stay.
2. The baseline is the mean training loss of the ``grace_steps`` steps before masking; the grace loss is
   the mean over the ``grace_steps`` steps after it.
3. At the end of the grace period, if grace loss > baseline x (1 + ``prune_grace_tolerance``), the masked
   experts are restored (unmasked) and protected from later removal; the schedule then picks the next
   least important experts. Otherwise they are removed physically.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from hf_moeprune.pruning.allocation import AllocationSpec, LayerBudget, allocate, removal_needed, select_experts
from hf_moeprune.pruning.criteria import get_criterion, rank_correlation
from hf_moeprune.pruning.schedules import ScheduleSpec, ScheduleState, get_schedule
from hf_moeprune.pruning.statistics import ExpertStatistics, LayerStats

logger = logging.getLogger(__name__)


@dataclass
class PruningEvent:
    step: int
    layer: int
    action: str  # "removed", "masked", "restored"
    original_ids: list[int]
    scores: list[float]
    experts_left: int


@dataclass
class GracePeriod:
    plan: dict[int, list[int]]  # layer -> positions to keep once the grace period passes
    masked: dict[int, list[int]]  # layer -> positions masked now
    start_step: int
    end_step: int
    baseline_loss: float
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    remove: dict[int, list[int]] = field(default_factory=dict)  # layer -> positions to keep (surgery now)
    mask: dict[int, list[int]] = field(default_factory=dict)  # layer -> positions to soft-mask
    unmask: dict[int, list[int]] = field(default_factory=dict)  # layer -> positions to restore


class PruningController:
    def __init__(
        self,
        *,
        budgets: dict[int, LayerBudget],
        original_ids: dict[int, list[int]],
        statistics: ExpertStatistics,
        criterion: str,
        schedule: str,
        schedule_spec: ScheduleSpec,
        allocation: AllocationSpec,
        stable_window: int = 10,
        stable_threshold: float = 0.9,
        grace_steps: int = 0,
        grace_tolerance: float = 0.05,
    ):
        self.budgets = dict(budgets)
        self.original_ids = {layer: list(ids) for layer, ids in original_ids.items()}
        self.statistics = statistics
        self.criterion = get_criterion(criterion)
        self.criterion_name = criterion
        self.schedule = get_schedule(schedule)
        self.schedule_spec = schedule_spec
        self.schedule_state = ScheduleState()
        self.allocation = allocation
        self.stable_window = stable_window
        self.stable_threshold = stable_threshold
        self.grace_steps = grace_steps
        self.grace_tolerance = grace_tolerance
        self.grace: GracePeriod | None = None
        self.protected: dict[int, set[int]] = {layer: set() for layer in budgets}  # original ids
        self.events: list[PruningEvent] = []
        self.stability: list[tuple[int, float]] = []
        self.usage_before: dict[int, list[float]] | None = None
        # statistics behind the latest removal, before they were narrowed to the kept experts (expert merging)
        self.decision_stats: dict[int, LayerStats] | None = None
        self._previous_window_scores: dict[int, torch.Tensor] | None = None
        self._recent_losses: deque[float] = deque(maxlen=max(grace_steps, 1))

    # -- per-step entry point ----------------------------------------------------------------
    def step(self, step: int, loss: float, snapshot: Callable[[], dict[int, LayerStats]]) -> Decision:
        """Called after optimizer step ``step`` with the (process-averaged) loss of that step."""
        self.statistics.end_step()
        cached: dict[int, LayerStats] | None = None

        def stats() -> dict[int, LayerStats]:
            nonlocal cached
            if cached is None:
                cached = snapshot()
            return cached

        if step % self.stable_window == 0 and self.schedule_state.stable_since is None:
            self._check_stability(step, stats())

        if self.grace is not None:
            self.grace.losses.append(loss)
            if step >= self.grace.end_step:
                self.decision_stats = stats()
                return self._end_grace(step)
            return Decision()

        self._recent_losses.append(loss)
        fraction = self.schedule(step, self.schedule_spec, self.schedule_state)
        if removal_needed(self.budgets, fraction) <= 0:
            return Decision()
        plan, removed = self._plan(fraction, stats())
        if not removed:
            return Decision()
        if self.usage_before is None:
            self.usage_before = self._usage_by_original_id(stats())
        if self.grace_steps > 0:
            baseline = sum(self._recent_losses) / len(self._recent_losses)
            self.grace = GracePeriod(plan, removed, step, step + self.grace_steps, baseline)
            self._log_events(step, "masked", removed, stats())
            return Decision(mask=removed)
        self._log_events(step, "removed", removed, stats())
        self.decision_stats = stats()
        self._commit(plan)
        return Decision(remove=plan)

    # -- decisions ---------------------------------------------------------------------------
    def scores(self, stats: dict[int, LayerStats]) -> dict[int, torch.Tensor]:
        return {layer: self.criterion(layer_stats).double() for layer, layer_stats in stats.items()}

    def _plan(self, fraction: float, stats: dict[int, LayerStats]):
        scores = self.scores(stats)
        loads = {layer: stats[layer].tokens for layer in stats}
        keep_counts = allocate(self.budgets, fraction, self.allocation, scores, loads)
        plan, removed = {}, {}
        for layer, count in keep_counts.items():
            if count >= self.budgets[layer].current:
                continue
            selection = scores[layer].clone()
            protected = [p for p, oid in enumerate(self.original_ids[layer]) if oid in self.protected[layer]]
            selection[protected] = math.inf  # restored by selective expansion: never chosen again
            kept = select_experts(selection, count, self.budgets[layer].groups)
            plan[layer] = kept
            removed[layer] = [p for p in range(self.budgets[layer].current) if p not in set(kept)]
        return plan, removed

    def _check_stability(self, step: int, stats: dict[int, LayerStats]) -> None:
        current = self.scores(stats)
        previous = self._previous_window_scores
        self._previous_window_scores = current
        if previous is None or any(previous[layer].numel() != current[layer].numel() for layer in current):
            return
        correlation = min(rank_correlation(previous[layer], current[layer]) for layer in current)
        self.stability.append((step, correlation))
        logger.info("step %d: expert ranking correlation with the previous window %.3f", step, correlation)
        if correlation >= self.stable_threshold and step >= self.schedule_spec.start_step:
            self.schedule_state.stable_since = step
            logger.info("step %d: expert ranking stable (>= %.2f); pruning may start", step, self.stable_threshold)

    def _end_grace(self, step: int) -> Decision:
        grace = self.grace
        self.grace = None
        grace_loss = sum(grace.losses) / max(len(grace.losses), 1)
        limit = grace.baseline_loss * (1.0 + self.grace_tolerance)
        if grace_loss > limit:
            logger.info(
                "step %d: loss %.4f over the grace period exceeds %.4f (baseline %.4f x (1 + %.3f)): restoring %s",
                step, grace_loss, limit, grace.baseline_loss, self.grace_tolerance, grace.masked,
            )  # fmt: skip
            for layer, positions in grace.masked.items():
                self.protected[layer].update(self.original_ids[layer][p] for p in positions)
            self._log_events(step, "restored", grace.masked, None)
            self._recent_losses.clear()
            return Decision(unmask=grace.masked)
        self._log_events(step, "removed", grace.masked, None)
        self._commit(grace.plan)
        return Decision(remove=grace.plan, unmask=grace.masked)

    def follow(self, plan: dict[int, list[int]]) -> None:
        """Track surgery decided elsewhere (e.g. a permutation for expert parallelism)."""
        self._commit(plan)

    def _commit(self, plan: dict[int, list[int]]) -> None:
        for layer, kept in plan.items():
            self.original_ids[layer] = [self.original_ids[layer][p] for p in kept]
            self.budgets[layer] = dataclasses.replace(self.budgets[layer], current=len(kept))
            self.statistics.select(layer, torch.tensor(kept))
        self._previous_window_scores = None

    # -- reporting ---------------------------------------------------------------------------
    def _log_events(self, step, action, positions_by_layer, stats):
        scores = self.scores(stats) if stats is not None else None
        for layer, positions in sorted(positions_by_layer.items()):
            event = PruningEvent(
                step=step,
                layer=layer,
                action=action,
                original_ids=[self.original_ids[layer][p] for p in positions],
                scores=[float(scores[layer][p]) for p in positions] if scores is not None else [],
                experts_left=self.budgets[layer].current - (len(positions) if action == "removed" else 0),
            )
            self.events.append(event)
            logger.info(
                "step %d layer %d: %s experts %s (scores %s), %d left",
                step, layer, action, event.original_ids, [round(s, 4) for s in event.scores], event.experts_left,
            )  # fmt: skip

    def _usage_by_original_id(self, stats: dict[int, LayerStats]) -> dict[int, list[float]]:
        usage = {}
        for layer, layer_stats in stats.items():
            row = [float("nan")] * self.budgets[layer].original
            for position, share in enumerate(layer_stats.load_share.tolist()):
                row[self.original_ids[layer][position]] = share
            usage[layer] = row
        return usage

    def report(self, stats: dict[int, LayerStats]) -> dict:
        return {
            "criterion": self.criterion_name,
            "schedule": asdict(self.schedule_spec),
            "allocation": asdict(self.allocation),
            "stable_since": self.schedule_state.stable_since,
            "stability": self.stability,
            "experts_per_layer": {layer: b.current for layer, b in self.budgets.items()},
            "original_experts_per_layer": {layer: b.original for layer, b in self.budgets.items()},
            "kept_expert_ids": self.original_ids,
            "events": [asdict(e) for e in self.events],
            "usage_before": self.usage_before,
            "usage_after": self._usage_by_original_id(stats),
        }

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "budgets": {layer: asdict(b) for layer, b in self.budgets.items()},
            "original_ids": self.original_ids,
            "statistics": self.statistics.state_dict(),
            "schedule_state": asdict(self.schedule_state),
            "grace": asdict(self.grace) if self.grace is not None else None,
            "protected": {layer: sorted(ids) for layer, ids in self.protected.items()},
            "events": [asdict(e) for e in self.events],
            "stability": self.stability,
            "usage_before": self.usage_before,
            "previous_window_scores": self._previous_window_scores,
            "recent_losses": list(self._recent_losses),
        }

    def load_state_dict(self, state: dict) -> None:
        self.budgets = {int(layer): LayerBudget(**b) for layer, b in state["budgets"].items()}
        self.original_ids = {int(layer): ids for layer, ids in state["original_ids"].items()}
        self.statistics.load_state_dict(state["statistics"])
        self.schedule_state = ScheduleState(**state["schedule_state"])
        self.grace = GracePeriod(**state["grace"]) if state["grace"] is not None else None
        self.protected = {int(layer): set(ids) for layer, ids in state["protected"].items()}
        self.events = [PruningEvent(**e) for e in state["events"]]
        self.stability = [tuple(x) for x in state["stability"]]
        self.usage_before = state["usage_before"]
        self._previous_window_scores = state["previous_window_scores"]
        self._recent_losses = deque(state["recent_losses"], maxlen=max(self.grace_steps, 1))
