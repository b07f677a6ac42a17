"""Expert load balancing: where experts live across expert-parallel devices, and checking it in the engine.

- ``placement``: load-aware expert placement (pure functions) and the vLLM EPLB maps;
- ``loads``: measure routing loads on calibration data, rebalance a model with ``permute_experts``;
- ``router``: router balancing terms for training (aux-loss-free bias rule, MaxVio, z-loss);
- ``expert_parallel``: load a model under transformers' ``DistributedConfig(ep_size=...)`` and count what
  each rank's experts compute.
"""

from hf_moeprune.balancing.expert_parallel import (
    RankExpertLoad,
    check_expert_parallel_counts,
    expert_parallel_config,
    load_expert_parallel,
)
from hf_moeprune.balancing.placement import (
    PLACEMENT_METHODS,
    PlacementPlan,
    balancedness,
    device_loads,
    peak_lower_bound,
    plan_placement,
)

__all__ = [
    "PLACEMENT_METHODS",
    "PlacementPlan",
    "RankExpertLoad",
    "balancedness",
    "check_expert_parallel_counts",
    "device_loads",
    "expert_parallel_config",
    "load_expert_parallel",
    "peak_lower_bound",
    "plan_placement",
]
