"""Pruning while fine-tuning with TRL's trainers.

``MoEPruneMixin`` holds the whole pruning machinery and ``MoEPruneArgumentsMixin`` its fields, so any TRL trainer
(any ``transformers.Trainer`` subclass) gets them with one small class each, the mixins first::

    @dataclass
    class MoEPruneDPOConfig(MoEPruneArgumentsMixin, DPOConfig):
        pass

    class MoEPruneDPOTrainer(MoEPruneMixin, DPOTrainer):
        pass

``SFTTrainer`` comes ready-made here. The router aux loss is added once, by the mixin (TRL's own is switched off),
and non-uniformly pruned models pad their router logits to one width with ``-inf`` so TRL's call to the stock
``load_balancing_loss_func`` works on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from hf_moeprune.training.arguments import MoEPruneArgumentsMixin
from hf_moeprune.training.trainer import MoEPruneMixin


@dataclass
class MoEPruneSFTConfig(MoEPruneArgumentsMixin, SFTConfig):
    """``trl.SFTConfig`` plus the pruning and balancing fields of ``MoEPruneArgumentsMixin``."""


class MoEPruneSFTTrainer(MoEPruneMixin, SFTTrainer):
    """``trl.SFTTrainer`` that prunes experts while it fine-tunes (full, LoRA through ``peft_config`` or a
    ``PeftModel``, QLoRA)."""

    args: MoEPruneSFTConfig
