"""Training with dynamic expert pruning: ``MoEPruneTrainer`` configured by ``MoEPruneArguments``; the same
machinery for any trainer as ``MoEPruneMixin`` + ``MoEPruneArgumentsMixin`` (TRL: ``hf_moeprune.training.trl_support``
ships ``MoEPruneSFTTrainer`` / ``MoEPruneSFTConfig``)."""

from hf_moeprune.training.arguments import MoEPruneArguments, MoEPruneArgumentsMixin
from hf_moeprune.training.trainer import MoEPruneMixin, MoEPruneTrainer

__all__ = ["MoEPruneArguments", "MoEPruneArgumentsMixin", "MoEPruneMixin", "MoEPruneTrainer"]
