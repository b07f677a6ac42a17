"""``hf-moeprune train``: fine-tune with dynamic expert pruning from a YAML recipe or flags."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Model folder or Hub id of an MoE causal LM."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    experts_implementation: str = field(
        default="grouped_mm", metadata={"help": "eager, grouped_mm or batched_mm (grouped_mm is fastest on CPU)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the model repo."})


@dataclass
class DataArguments:
    data: str = field(
        metadata={"help": "A `datasets` dataset saved on disk, a .jsonl file, a text file or a folder of text files."}
    )
    text_field: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Held-out share when the data has no validation split (0 = none)."}
    )

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be >= 2")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be in [0, 1)")


def train_main(argv: Sequence[str]) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_moeprune.data import load_text_dataset, tokenize_and_pack
    from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer
    from hf_moeprune.utils import parse_args

    model_args, data_args, args = parse_args(
        (ModelArguments, DataArguments, MoEPruneArguments), argv, prog="hf-moeprune train"
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        experts_implementation=model_args.experts_implementation,
    )
    raw = load_text_dataset(data_args.data, data_args.text_field, data_args.validation_fraction, args.seed)
    data = tokenize_and_pack(raw, tokenizer, data_args.block_size)
    trainer = MoEPruneTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    summary = {
        "output_dir": args.output_dir,
        "train_loss": result.training_loss,
        "experts_per_layer": trainer.model.config.experts_per_layer,
        "routed_experts": sum(c for c in trainer.model.config.experts_per_layer if c),
        "original_routed_experts": trainer.model.config.original_num_experts
        * sum(1 for c in trainer.model.config.experts_per_layer if c),
    }
    if "validation" in data:
        metrics = trainer.evaluate()
        summary["eval_loss"] = metrics["eval_loss"]
        summary["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    print(json.dumps(summary, indent=2))
    return 0
