"""``hf-moeprune train``: fine-tune with dynamic expert pruning from a YAML recipe or flags."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class OutputArguments:
    overwrite: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty output_dir: its old checkpoints are deleted at the start and its "
                  "model is replaced (atomically) by the new one at the end."},
    )  # fmt: skip


@dataclass
class LoraArguments:
    """peft LoRA for ``hf-moeprune train`` (``lora_r: 0``, the default, is full fine-tuning)."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning (no adapters)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (update scale alpha / r)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "nn.Linear modules that get LoRA (peft target_modules)."},
    )
    lora_target_parameters: list[str] = field(
        default_factory=lambda: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        metadata={"help": "Fused expert tensors that get per-expert LoRA (peft target_parameters); sliced with the "
                  "experts when experts are removed. Pass 'none' for attention-only LoRA."},
    )  # fmt: skip
    lora_merge: bool = field(
        default=False, metadata={"help": "Also write the adapter merged into the pruned base to output_dir/merged."}
    )

    def __post_init__(self):
        if self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r} must be >= 0 (0 = full fine-tuning)")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha} must be > 0")
        if [t.lower() for t in self.lora_target_parameters] == ["none"]:
            self.lora_target_parameters = []
        if self.lora_r and not (self.lora_target_modules or self.lora_target_parameters):
            raise ValueError("lora_r > 0 needs lora_target_modules or lora_target_parameters")
        if self.lora_merge and not self.lora_r:
            raise ValueError("lora_merge=true needs a LoRA run (lora_r > 0)")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.lora_target_modules) or None,
            target_parameters=list(self.lora_target_parameters) or None,
            task_type="CAUSAL_LM",
        )


def main(argv: Sequence[str]) -> int:
    from transformers import AutoTokenizer

    from hf_moeprune.commands._parsing import parse_args
    from hf_moeprune.commands._shared import check_output_dir
    from hf_moeprune.data import load_text_dataset, tokenize_and_pack
    from hf_moeprune.loading import load_model
    from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer
    from hf_moeprune.utils import replace_model_files

    model_args, data_args, lora_args, args, output = parse_args(
        (ModelArguments, DataArguments, LoraArguments, MoEPruneArguments, OutputArguments),
        argv,
        prog="hf-moeprune train",
    )
    if not Path(data_args.data).exists():
        raise FileNotFoundError(f"--data {data_args.data!r} does not exist")
    resume = check_output_dir(args, output.overwrite)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    raw = load_text_dataset(data_args.data, data_args.text_field, data_args.validation_fraction, args.seed)
    data = tokenize_and_pack(raw, tokenizer, data_args.block_size)  # bad data fails before the model is read
    model = load_model(
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        experts_implementation=model_args.experts_implementation,
    )
    if lora_args.lora_r:
        from peft import get_peft_model

        model = get_peft_model(model, lora_args.peft_config())
    trainer = MoEPruneTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    # The final model is saved beside the checkpoints, then moved in with config.json last, so a kill leaves
    # the old model, no model, or the new one; never a new config beside old weights.
    staged = Path(args.output_dir) / ".final-model.tmp"
    if args.should_save and staged.exists():
        shutil.rmtree(staged)
    trainer.save_model(str(staged))
    if args.should_save:
        # a LoRA run saves the adapter at the top (its config is what PeftModel reads first), the base below
        marker = "adapter_config.json" if (staged / "adapter_config.json").is_file() else "config.json"
        replace_model_files(staged, args.output_dir, marker=marker)
    config = trainer.moe_model.config
    summary = {
        "output_dir": args.output_dir,
        "train_loss": result.training_loss,
        "experts_per_layer": config.experts_per_layer,
        "routed_experts": sum(c for c in config.experts_per_layer if c),
        "original_routed_experts": config.original_num_experts * sum(1 for c in config.experts_per_layer if c),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    if lora_args.lora_r:
        from hf_moeprune.lora import merge_saved_lora
        from hf_moeprune.training.trainer import BASE_SUBDIR

        summary["base_model"] = str(Path(args.output_dir) / BASE_SUBDIR)
        if lora_args.lora_merge and args.should_save:
            merged = Path(args.output_dir) / "merged"
            merge_saved_lora(args.output_dir, str(merged))
            tokenizer.save_pretrained(merged)
            summary["merged_model"] = str(merged)
    if "validation" in data:
        metrics = trainer.evaluate()
        summary["eval_loss"] = metrics["eval_loss"]
        summary["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    print(json.dumps(summary, indent=2))
    return 0
