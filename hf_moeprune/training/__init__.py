"""Training with dynamic expert pruning: ``MoEPruneTrainer`` configured by ``MoEPruneArguments``."""

from hf_moeprune.training.arguments import MoEPruneArguments
from hf_moeprune.training.trainer import MoEPruneTrainer

__all__ = ["MoEPruneArguments", "MoEPruneTrainer"]
