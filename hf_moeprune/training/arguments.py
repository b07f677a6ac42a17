"""``MoEPruneArguments``: ``TrainingArguments`` plus the fields of dynamic expert pruning and router balancing."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hf_moeprune.pruning.allocation import ALLOCATION_MODES
from hf_moeprune.pruning.criteria import get_criterion
from hf_moeprune.pruning.schedules import get_schedule


@dataclass
class MoEPruneArgumentsMixin:
    """The fields of dynamic expert pruning and router balancing, to mix into any ``TrainingArguments`` subclass
    (``MoEPruneArguments`` for ``Trainer``, ``MoEPruneSFTConfig`` for TRL's ``SFTConfig``, or your own:
    ``@dataclass class MyConfig(MoEPruneArgumentsMixin, DPOConfig): pass``). Every default works without tuning."""

    prune_criterion: str = field(
        default="reap",
        metadata={"help": "Expert importance criterion: frequency, prob_mass, reap, reap_frequency or saliency."},
    )
    prune_target: float = field(
        default=0.5, metadata={"help": "Fraction of all routed experts to remove by the end of pruning (0 = none)."}
    )
    prune_schedule: str = field(
        default="gradual",
        metadata={
            "help": "oneshot (all at prune_start_step), gradual (cubic ramp to prune_end_step) or stable "
            "(all at once when the expert ranking stops changing; at prune_end_step at the latest)."
        },
    )
    prune_start_step: int | None = field(
        default=None, metadata={"help": "First step at which experts may be removed. Default: 10 percent of training."}
    )
    prune_end_step: int | None = field(
        default=None, metadata={"help": "Step by which the target is reached. Default: 50 percent of training."}
    )
    prune_frequency: int = field(default=1, metadata={"help": "Gradual schedule: prune at most every N steps."})
    prune_layer_adaptive: bool = field(
        default=True, metadata={"help": "Let layers keep different numbers of experts (False: uniform)."}
    )
    prune_allocation: str = field(
        default="laep",
        metadata={
            "help": "Layer-adaptive rule: laep (Yuan3.0 Ultra: load below alpha x mean, cumulative share "
            "within beta, beta solved for the target) or global (lowest score relative to its layer's mean)."
        },
    )
    prune_laep_alpha: float = field(default=1.0, metadata={"help": "LAEP: candidate if load < alpha x layer mean."})
    prune_laep_beta: float = field(default=0.1, metadata={"help": "LAEP: initial cumulative load share per layer."})
    prune_min_experts: int | None = field(
        default=None, metadata={"help": "Floor of experts per layer. Default: the model's top-k."}
    )
    prune_multiple_of: int = field(
        default=1, metadata={"help": "Keep per-layer counts a multiple of this (e.g. the expert-parallel size)."}
    )
    prune_stats_window: int = field(
        default=0, metadata={"help": "Accumulate statistics over the last N steps (0: exponential decay instead)."}
    )
    prune_stats_decay: float = field(
        default=0.98, metadata={"help": "Per-step decay of the statistics when prune_stats_window is 0 (1 = sum)."}
    )
    prune_reap_interval: int = field(
        default=1,
        metadata={"help": "Record the REAP statistic on every N-th optimizer step only. It needs each expert's "
                  "output per (token, expert) pair, which costs ~10-25 percent of a step on small models; token counts "
                  "and router statistics are still recorded on every step."},
    )  # fmt: skip
    prune_stable_window: int = field(
        default=10, metadata={"help": "Stable schedule: steps per window whose rankings are compared."}
    )
    prune_stable_threshold: float = field(
        default=0.9,
        metadata={"help": "Stable schedule: Spearman correlation of consecutive windows' rankings (min over layers)."},
    )
    prune_grace_steps: int = field(
        default=0,
        metadata={"help": "Selective expansion: soft-mask experts for N steps before removing them (0 = off)."},
    )
    prune_grace_tolerance: float = field(
        default=0.05,
        metadata={
            "help": "Selective expansion: restore the masked experts if the mean training loss over the grace "
            "period exceeds the mean before masking by more than this relative amount."
        },
    )
    balance_ep_size: int = field(
        default=0,
        metadata={
            "help": "Expert-parallel size to serve with: per-layer counts stay divisible by it and, after each "
            "removal, experts are reordered so each rank's contiguous block gets equal measured load (0 = off)."
        },
    )
    prune_merge: bool = field(
        default=False,
        metadata={
            "help": "At each removal, fold every removed expert into its most similar kept expert (cosine similarity "
            "of the expert weights; frequency-weighted average by the tracked token counts) instead of dropping it."
        },
    )
    prune_export_stock: bool = field(
        default=True,
        metadata={"help": "save_model writes the stock architecture when every layer keeps the same expert count."},
    )
    prune_report: bool = field(
        default=True, metadata={"help": "Write pruning_report.json and an expert-usage heatmap to output_dir."}
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Switch load-balancing loss coefficient. Default: the model config's router_aux_loss_coef "
            "(0 if it has none). Computed per layer from the router logits, for every family."
        },
    )
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "Router z-loss coefficient (mean logsumexp^2)."})
    router_bias_update_rate: float = field(
        default=0.0,
        metadata={"help": "Aux-loss-free balancing (DeepSeek-V3): per-step bias nudge gamma (e.g. 1e-3; 0 = off)."},
    )

    def __post_init__(self):
        # the TrainingArguments subclass this is mixed into validates its own fields first
        super().__post_init__()
        get_criterion(self.prune_criterion)
        get_schedule(self.prune_schedule)
        if not 0.0 <= self.prune_target < 1.0:
            raise ValueError(f"prune_target={self.prune_target} must be in [0, 1)")
        if self.prune_allocation not in ALLOCATION_MODES or self.prune_allocation == "uniform":
            raise ValueError(
                f"prune_allocation={self.prune_allocation!r}; known: ['laep', 'global'] "
                "(set prune_layer_adaptive=False for uniform)"
            )
        for name in ("prune_start_step", "prune_end_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if (
            self.prune_start_step is not None
            and self.prune_end_step is not None
            and self.prune_end_step < self.prune_start_step
        ):
            raise ValueError(f"prune_end_step={self.prune_end_step} is before prune_start_step={self.prune_start_step}")
        positive = ("prune_frequency", "prune_multiple_of", "prune_stable_window", "prune_reap_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.balance_ep_size < 0:
            raise ValueError(f"balance_ep_size={self.balance_ep_size} must be >= 0")
        if self.prune_min_experts is not None and self.prune_min_experts < 1:
            raise ValueError(f"prune_min_experts={self.prune_min_experts} must be >= 1")
        if self.prune_stats_window < 0:
            raise ValueError(f"prune_stats_window={self.prune_stats_window} must be >= 0")
        if not 0.0 < self.prune_stats_decay <= 1.0:
            raise ValueError(f"prune_stats_decay={self.prune_stats_decay} must be in (0, 1]")
        if not -1.0 <= self.prune_stable_threshold <= 1.0:
            raise ValueError(f"prune_stable_threshold={self.prune_stable_threshold} must be in [-1, 1]")
        if self.prune_grace_steps < 0 or self.prune_grace_tolerance < 0:
            raise ValueError(
                f"prune_grace_steps={self.prune_grace_steps} and prune_grace_tolerance={self.prune_grace_tolerance} "
                "must be >= 0"
            )
        for name in ("router_z_loss_coef", "router_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0")
        if self.prune_laep_alpha <= 0 or not 0 <= self.prune_laep_beta <= 1:
            raise ValueError(
                f"prune_laep_alpha={self.prune_laep_alpha} must be > 0 and prune_laep_beta={self.prune_laep_beta} "
                "in [0, 1]"
            )


@dataclass
class MoEPruneArguments(MoEPruneArgumentsMixin, TrainingArguments):
    """Training arguments for :class:`MoEPruneTrainer`: ``TrainingArguments`` plus the pruning fields."""
