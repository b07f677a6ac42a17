"""Batched generation for pruned, quantized or stock MoE causal LMs, from a JSONL file of prompts.

Pipeline: read and validate the prompt lines -> tokenize -> hand token lists to an engine -> turn
each finished token list into a completion (EOS / stop-string / length rules) -> write it.

Engines (registry ``ENGINES``):

* ``padded``: prompts are sorted by token length inside windows of ``sort_window`` consecutive
  prompts, cut into batches of ``batch_size``, left-padded and generated with ``model.generate`` and
  its KV cache. Works with anything that has ``generate`` (stock, pruned, quantized models).
* ``continuous``: transformers' continuous batching manager (paged KV cache, requests join and leave
  the running batch as they start and finish; ``batch_size`` caps the requests per step). Falls back
  to ``padded`` for every prompt it could not finish (model without continuous batching support,
  unsupported attention, a failed request).
* ``auto``: ``padded``, the faster of the two on CPU in ``benchmarks/inference_benchmark.py``; and the
  only one whose sampling is reproducible from a seed (continuous batching samples in a background
  thread whose batch composition depends on timing).

Output order rule: results are written in the prompts' original order. A result is appended (and
flushed) as soon as it and every result before it are done; later results wait in memory. Engines
finish prompts roughly in order (``padded`` processes a window at a time, starting with the batch that
holds the window's first prompt), so an interrupted run loses at most about one window of finished
work, and ``resume`` then skips every id already in the output file. Because the file is always an
in-order prefix, a resumed run completes it in the original order.

Finish rules, per prompt: an EOS token ends the completion (``finish_reason="eos"``, EOS not in the
text); else the earliest stop string ends it (``"stop"``, the text is cut just before the stop
string); else ``"length"`` (``max_new_tokens`` reached). ``tokens`` counts the generated tokens the
completion used, including the EOS token or the token that completed the stop string.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hf_moeprune.inference.completion import FINISH_REASONS, Completion, finish_completion
from hf_moeprune.inference.engines import (
    ENGINES,
    EXPERTS_IMPLEMENTATIONS,
    Engine,
    OnDone,
    continuous_engine,
    padded_engine,
    plan_batches,
    resolve_engine,
    set_experts_implementation,
)
from hf_moeprune.inference.generator import BatchGenerator, build_generation_config, generate, generate_file
from hf_moeprune.inference.memory import PeakMemory
from hf_moeprune.inference.options import GenerationOptions
from hf_moeprune.inference.output import OrderedWriter, exclusive_output, jsonl_appender, mark_as_ours, writer_marker
from hf_moeprune.inference.prompts import BadLine, Prompt, completed_ids, parse_prompt_lines, read_prompts
from hf_moeprune.inference.stats import GenerationStats

__all__ = [
    "ENGINES",
    "EXPERTS_IMPLEMENTATIONS",
    "FINISH_REASONS",
    "BadLine",
    "BatchGenerator",
    "Completion",
    "Engine",
    "GenerationOptions",
    "GenerationStats",
    "OnDone",
    "OrderedWriter",
    "PeakMemory",
    "Prompt",
    "build_generation_config",
    "completed_ids",
    "continuous_engine",
    "exclusive_output",
    "finish_completion",
    "generate",
    "generate_file",
    "jsonl_appender",
    "mark_as_ours",
    "padded_engine",
    "parse_prompt_lines",
    "plan_batches",
    "read_prompts",
    "resolve_engine",
    "set_experts_implementation",
    "writer_marker",
]


# --------------------------------------------------------------------------------------------------------------
# command line


@dataclass
class GenerateArguments:
    model: str = field(metadata={"help": "model folder or Hub id (a pruned, quantized or stock MoE causal LM)"})
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
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")


def load_model_and_tokenizer(args: GenerateArguments):
    """The model (pruned models load through ``import hf_moeprune``'s Auto registration) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_moeprune  # noqa: F401  (registers the pruned-model classes with the Auto classes)

    with contextlib.suppress(ImportError):
        import hf_moeprune.quantization  # noqa: F401  (registers quant_method="hf_moeprune" for from_pretrained)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    return model, tokenizer


def generate_main(argv: Sequence[str]) -> int:
    """``hf-moeprune generate [MODEL] --prompts P --out O [options]``; a leading MODEL means ``--model MODEL``."""
    from hf_moeprune.utils import parse_args

    argv = list(argv)
    if argv and not argv[0].startswith("-") and not argv[0].endswith((".yaml", ".yml")):
        argv = ["--model", argv[0], *argv[1:]]
    try:
        args, options = parse_args((GenerateArguments, GenerationOptions), argv, prog="hf-moeprune generate")
    except ValueError as exc:
        raise SystemExit(f"hf-moeprune generate: {exc}") from None
    out = Path(args.out)
    if out.is_file() and out.stat().st_size > 0 and not (args.resume or args.overwrite):
        raise SystemExit(f"--out {args.out!r} already has results; pass --resume to continue it, or --overwrite")
    if not Path(args.prompts).is_file():
        raise SystemExit(f"--prompts {args.prompts!r} does not exist")
    prompts, _ = read_prompts(args.prompts)  # a file without one valid prompt fails before the model loads
    if not prompts:
        raise SystemExit(f"hf-moeprune generate: --prompts {args.prompts!r} holds no valid prompt")
    if args.resume and out.is_file() and not writer_marker(out).exists():
        completed_ids(out, truncate_partial=False)  # a file this tool did not write is refused, not repaired
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
