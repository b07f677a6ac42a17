"""``hf-moeprune distill``: distil the unpruned teacher into the pruned student (``MoEDistillTrainer``)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class DistillCLIArguments:
    student: str = field(metadata={"help": "the pruned student: model path or Hub id"})
    teacher: str = field(metadata={"help": "the teacher (unpruned model or any checkpoint with the same vocabulary)"})
    data: str = field(
        metadata={"help": "training text: a saved `datasets` dataset, a .jsonl file, a text file or a folder of them"}
    )
    eval_data: str | None = field(default=None, metadata={"help": "held-out text in the same format, for evaluate()"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer path (default: the student path)"})
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={"help": "teacher tokenizer for the vocabulary check (default: the teacher path, if it has one)"},
    )
    text_field: str = field(default="text", metadata={"help": "JSONL field holding the text"})
    block_size: int = field(default=512, metadata={"help": "tokens per packed training sequence (> 1)"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "distil into a non-empty output_dir: its old checkpoints are deleted at the start and "
                  "its model is replaced (atomically) at the end"},
    )  # fmt: skip

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size!r} must be >= 2 (a causal LM needs a next token)")
        # every form the help text names and data.load_text_dataset reads: a file, or a folder (a saved
        # dataset or text files); this check once demanded a file and refused the folders (issue 17)
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise ValueError(f"{name}={value!r} is not a file or folder (it does not exist)")


def _maybe_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        logger.info("no tokenizer at %s; the tokenizer vocabulary check is skipped for it", path)
        return None


def main(argv: Sequence[str]) -> int:
    """``hf-moeprune distill --student PATH --teacher PATH --data FILE --output_dir DIR [TrainingArguments]``."""
    from transformers import AutoConfig, AutoTokenizer

    from hf_moeprune.commands._parsing import parse_args
    from hf_moeprune.commands._shared import check_output_dir
    from hf_moeprune.data import load_text_dataset, tokenize_and_pack
    from hf_moeprune.distillation import MoEDistillArguments, MoEDistillTrainer, check_same_vocabulary
    from hf_moeprune.utils import remove_stale_temporaries, replace_model_files

    cli, args = parse_args((DistillCLIArguments, MoEDistillArguments), argv, prog="hf-moeprune distill")
    final_dir = args.output_dir
    # Checked before any work: a non-empty output_dir is refused unless resuming its run or --overwrite.
    # Checkpoints go to output_dir/checkpoint-N (visible, resumable); the final student is moved in at the end
    # with config.json last, so a kill leaves the previous model, no model, or the new one.
    resume = check_output_dir(args, cli.overwrite, needs_pruning_state=False)
    remove_stale_temporaries(final_dir)  # hidden folders of runs killed under earlier versions
    tokenizer = AutoTokenizer.from_pretrained(cli.tokenizer or cli.student)
    teacher_tokenizer = _maybe_tokenizer(cli.teacher_tokenizer or cli.teacher)
    # Fail on a vocabulary mismatch before reading data or weights.
    student_config, teacher_config = (
        AutoConfig.from_pretrained(cli.student),
        AutoConfig.from_pretrained(cli.teacher),
    )
    check_same_vocabulary(student_config, teacher_config, tokenizer, teacher_tokenizer)
    train = tokenize_and_pack(load_text_dataset(cli.data, cli.text_field), tokenizer, cli.block_size)["train"]
    held_out = None
    if cli.eval_data:
        held_out = tokenize_and_pack(load_text_dataset(cli.eval_data, cli.text_field), tokenizer, cli.block_size)
        held_out = held_out["train"]
    trainer = MoEDistillTrainer(
        model=cli.student,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        teacher_model=cli.teacher,
        teacher_processing_class=teacher_tokenizer,
    )
    before = trainer.evaluate() if held_out else {}
    result = trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate() if held_out else {}
    staged = Path(final_dir) / ".final-model.tmp"
    if args.should_save and staged.exists():
        shutil.rmtree(staged)
    trainer.save_model(str(staged))  # also writes the tokenizer (processing_class)
    if args.should_save:
        replace_model_files(staged, final_dir)
    logger.info("saved distilled student to %s", final_dir)
    rows = [("train_loss", result.training_loss)]
    for key in ("eval_ce", "eval_kl", "eval_teacher_ce"):
        if key in after:
            rows.append((f"{key} before -> after", f"{before[key]:.4f} -> {after[key]:.4f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
