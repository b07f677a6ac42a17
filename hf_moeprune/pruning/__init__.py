"""Pruning decisions as pure functions: statistics -> criteria -> schedules -> allocation."""

from hf_moeprune.pruning.allocation import ALLOCATION_MODES, AllocationSpec, LayerBudget, allocate, select_experts
from hf_moeprune.pruning.criteria import CRITERIA, get_criterion, rank_correlation, register_criterion
from hf_moeprune.pruning.schedules import SCHEDULES, ScheduleSpec, ScheduleState, get_schedule, register_schedule
from hf_moeprune.pruning.statistics import ExpertStatistics, LayerStats

__all__ = [
    "ALLOCATION_MODES",
    "CRITERIA",
    "SCHEDULES",
    "AllocationSpec",
    "ExpertStatistics",
    "LayerBudget",
    "LayerStats",
    "ScheduleSpec",
    "ScheduleState",
    "allocate",
    "get_criterion",
    "get_schedule",
    "rank_correlation",
    "register_criterion",
    "register_schedule",
    "select_experts",
]
