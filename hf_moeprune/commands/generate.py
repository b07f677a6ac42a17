"""``hf-moeprune generate [MODEL] --prompts P --out O``: batched generation from a JSONL file of prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hf_moeprune.commands._parsing import parse_args
from hf_moeprune.inference import (
    GenerationOptions,
    check_output_file,
    exclusive_output,
    generate_file,
    read_prompts,
)


@dataclass
class GenerateArguments:
    model: str = field(
        metadata={"help": "model folder or Hub id (a pruned, quantized or stock MoE model; vision-language ones take "
                  "text prompts)"}
    )  # fmt: skip
    prompts: str = field(metadata={"help": 'JSONL file, one {"id": ..., "prompt": ...} per line'})
    out: str = field(metadata={"help": "JSONL file the results are appended to, one line per prompt, in order"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or id (default: the model's)"})
    resume: bool = field(default=False, metadata={"help": "skip prompts whose id is already in --out"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace an existing --out (kept until the new results are complete)"}
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu) | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (as saved) | float32 | bfloat16 | float16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own modeling code"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    stats_json: str | None = field(default=None, metadata={"help": "also write the throughput summary as JSON"})

    def __post_init__(self) -> None:
        dtypes = ("auto", "float32", "bfloat16", "float16")
        if self.dtype not in dtypes:
            raise ValueError(f"--dtype {self.dtype!r} is not known; choose one of {list(dtypes)}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device {self.device!r} is not known; use auto, cpu, cuda or cuda:N")


def check_out(out_arg: str, resume: bool, overwrite: bool) -> None:
    """The library's rules for ``--out`` (``check_output_file``), checked once before the model is loaded."""
    try:
        check_output_file(out_arg, resume, overwrite)
    except (ValueError, FileExistsError) as exc:
        raise SystemExit(f"hf-moeprune generate: {exc}") from None


def load_model_and_tokenizer(args: GenerateArguments):
    """The model, with the Auto class its family names (``hf_moeprune.loading``: pruned, quantized and
    vision-language models too; prompts are text), and its tokenizer."""
    from transformers import AutoTokenizer

    from hf_moeprune.loading import load_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    return model, tokenizer


def main(argv: Sequence[str]) -> int:
    """``hf-moeprune generate [MODEL] --prompts P --out O [options]``; a leading MODEL means ``--model MODEL``."""
    argv = list(argv)
    if argv and not argv[0].startswith("-") and not argv[0].endswith((".yaml", ".yml")):
        argv = ["--model", argv[0], *argv[1:]]
    try:
        args, options = parse_args((GenerateArguments, GenerationOptions), argv, prog="hf-moeprune generate")
    except ValueError as exc:
        raise SystemExit(f"hf-moeprune generate: {exc}") from None
    out = Path(args.out)
    check_out(args.out, args.resume, args.overwrite)
    if not Path(args.prompts).is_file():
        raise SystemExit(f"--prompts {args.prompts!r} does not exist")
    prompts, _ = read_prompts(args.prompts)  # a file without one valid prompt fails before the model loads
    if not prompts:
        raise SystemExit(f"hf-moeprune generate: --prompts {args.prompts!r} holds no valid prompt")
    with exclusive_output(out):  # fail fast when another process writes --out; generate_file locks again
        pass
    model, tokenizer = load_model_and_tokenizer(args)
    try:
        stats = generate_file(
            model,
            tokenizer,
            args.prompts,
            args.out,
            options,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=args.progress,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise SystemExit(f"hf-moeprune generate: {exc}") from None
    print(stats.summary())
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(asdict(stats), indent=2) + "\n")
    return 0
