"""Expert load balancing: where experts live across expert-parallel devices."""

from hf_moeprune.balancing.placement import (
    PLACEMENT_METHODS,
    PlacementPlan,
    balancedness,
    device_loads,
    peak_lower_bound,
    plan_placement,
)

__all__ = ["PLACEMENT_METHODS", "PlacementPlan", "balancedness", "device_loads", "peak_lower_bound", "plan_placement"]
