"""Pruning schedules: pure functions deciding how much of the target is removed by a given step.

A schedule maps ``(step, ScheduleState)`` to the fraction of routed experts that should be gone by then
(0 before pruning starts, the full target at the end). The trainer prunes whenever that fraction grows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleSpec:
    target: float
    start_step: int
    end_step: int
    frequency: int = 1
    power: float = 3.0


@dataclass
class ScheduleState:
    """Mutable facts a schedule may depend on; checkpointed with the trainer."""

    stable_since: int | None = None  # first step at which the expert ranking was found stable


Schedule = Callable[[int, ScheduleSpec, ScheduleState], float]
SCHEDULES: dict[str, Schedule] = {}


def register_schedule(name: str):
    def decorator(fn: Schedule) -> Schedule:
        if name in SCHEDULES:
            raise ValueError(f"schedule {name!r} is already registered")
        SCHEDULES[name] = fn
        return fn

    return decorator


def get_schedule(name: str) -> Schedule:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown prune_schedule {name!r}; known: {sorted(SCHEDULES)}") from None


@register_schedule("oneshot")
def oneshot(step: int, spec: ScheduleSpec, state: ScheduleState) -> float:
    """Everything at ``start_step``."""
    return spec.target if step >= spec.start_step else 0.0


@register_schedule("gradual")
def gradual(step: int, spec: ScheduleSpec, state: ScheduleState) -> float:
    """Polynomial (cubic by default) ramp from ``start_step`` to ``end_step`` (Zhu & Gupta 2017), updated every
    ``frequency`` steps: fast early, when many experts are clearly useless, and slow near the target."""
    if step < spec.start_step:
        return 0.0
    if step >= spec.end_step:
        return spec.target
    quantised = spec.start_step + ((step - spec.start_step) // spec.frequency) * spec.frequency
    progress = (quantised - spec.start_step) / max(spec.end_step - spec.start_step, 1)
    return spec.target * (1.0 - (1.0 - progress) ** spec.power)


@register_schedule("stable")
def stable(step: int, spec: ScheduleSpec, state: ScheduleState) -> float:
    """Everything once the expert ranking is stable (LAEP prunes once loads stop moving); at ``end_step`` at the
    latest, so a run never ends unpruned."""
    if step < spec.start_step:
        return 0.0
    if state.stable_since is not None or step >= spec.end_step:
        return spec.target
    return 0.0
