"""``hf-moeprune``: one console script, one subcommand per stage of the pipeline.

Each subcommand is a registry entry: its argument dataclasses (parsed with ``HfArgumentParser``, so
``--help`` lists every field with its help text and a YAML recipe can fill them) and the function that
runs it. A subcommand's implementation lives in the module of its concern; this file only wires them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module

logger = logging.getLogger("hf_moeprune")


@dataclass(frozen=True)
class Command:
    """A subcommand: ``target`` is ``"module:function"``; the function takes the argv tail."""

    name: str
    help: str
    target: str


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, target: str) -> None:
    if name in COMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    COMMANDS[name] = Command(name, help, target)


register_command(
    "demo", "run the whole pipeline on the built-in default (no downloads)", "hf_moeprune.demo.pipeline:demo_main"
)
register_command("train", "fine-tune while pruning experts (MoEPruneTrainer)", "hf_moeprune.training.cli:train_main")
register_command(
    "balance", "reorder experts so expert-parallel ranks get equal load", "hf_moeprune.balancing.cli:balance_main"
)
register_command(
    "quantize", "quantize weights (fused experts included) and save", "hf_moeprune.quantization.cli:quantize_main"
)
register_command(
    "distill", "distil the unpruned teacher into a pruned student", "hf_moeprune.distillation:distill_main"
)
register_command("generate", "batched generation from a JSONL file of prompts", "hf_moeprune.inference:generate_main")
register_command(
    "compress", "distill, quantize, write the card and push, from a YAML recipe", "hf_moeprune.compress:compress_main"
)
register_command("prune", "one-shot pruning: REAP etc. on calibration data, or a plan", "hf_moeprune.cli:prune_main")
register_command("push", "push a model folder (and its model card) to the Hub", "hf_moeprune.hub:push_main")


@dataclass
class PruneCLIArguments:
    model: str = field(metadata={"help": "model path or Hub id"})
    output_dir: str = field(metadata={"help": "where to save the pruned model (must be new or empty)"})
    keep: str | None = field(
        default=None,
        metadata={"help": "explicit plan: JSON object mapping layer index to the expert indices to keep, "
                  "e.g. '{\"0\": [0, 2, 5]}'; give either --keep or --data"},
    )  # fmt: skip
    plan: str | None = field(
        default=None,
        metadata={"help": "explicit plan from a JSON file (the same object as --keep)"},
    )
    data: str | None = field(
        default=None,
        metadata={"help": "one-shot pruning from statistics on this calibration text (a saved dataset, .jsonl, "
                  "a text file or a folder); give one of --keep, --plan or --data"},
    )  # fmt: skip
    criterion: str = field(
        default="reap", metadata={"help": "expert score: reap | reap_frequency | frequency | prob_mass | saliency"}
    )
    target: float = field(default=0.5, metadata={"help": "fraction of all routed experts to remove"})
    allocation: str = field(
        default="uniform", metadata={"help": "how removals spread over layers: uniform | global | laep"}
    )
    min_experts: int | None = field(default=None, metadata={"help": "floor per layer (default: top-k)"})
    multiple_of: int = field(default=1, metadata={"help": "keep per-layer counts divisible by this (e.g. ep_size)"})
    text_field: str = field(default="text", metadata={"help": "column holding the text"})
    block_size: int = field(default=128, metadata={"help": "tokens per calibration block"})
    max_blocks: int = field(default=256, metadata={"help": "calibration blocks to route (at most)"})
    batch_size: int = field(default=8, metadata={"help": "blocks per forward pass"})
    export_stock: bool = field(
        default=True, metadata={"help": "write the stock architecture when every layer keeps the same count"}
    )
    streaming: bool = field(
        default=True,
        metadata={"help": "apply a known plan shard by shard without loading the model (local safetensors "
                  "checkpoints; others are loaded in memory, with the reason logged)"},
    )  # fmt: skip
    max_shard_size: str = field(
        default="5GB", metadata={"help": "largest output shard of the streamed path (bounds its memory too)"}
    )

    def __post_init__(self):
        from hf_moeprune.pruning.allocation import AllocationSpec
        from hf_moeprune.pruning.criteria import get_criterion
        from hf_moeprune.streaming import parse_size

        given = [name for name in ("keep", "plan", "data") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of --keep (an explicit plan), --plan (a plan file) or --data (one-shot from "
                f"statistics); got {', '.join(given) or 'none'}"
            )
        parse_size(self.max_shard_size)
        get_criterion(self.criterion)  # names the known criteria
        AllocationSpec(self.allocation)
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target={self.target} must be in [0, 1)")
        for name in ("multiple_of", "block_size", "max_blocks", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.min_experts is not None and self.min_experts < 1:
            raise ValueError(f"min_experts={self.min_experts} must be >= 1")


def _read_plan(args) -> dict[int, list[int]] | None:
    """The explicit plan of ``--keep`` (JSON text) or ``--plan`` (a JSON file); None for one-shot from data."""
    import json
    from pathlib import Path

    if args.keep is None and args.plan is None:
        return None
    source = f"--keep {args.keep!r}" if args.keep is not None else f"--plan {args.plan!r}"
    if args.plan is not None:
        if not Path(args.plan).is_file():
            raise SystemExit(f"{source}: no such file")
        text = Path(args.plan).read_text()
    else:
        text = args.keep
    try:
        plan = json.loads(text)
        return {int(k): [int(i) for i in v] for k, v in plan.items()}
    except (json.JSONDecodeError, AttributeError, ValueError, TypeError) as exc:
        raise SystemExit(f"{source} is not a JSON object of layer -> expert list: {exc}") from None


def prune_main(argv: Sequence[str]) -> int:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_moeprune.surgery import prune_experts
    from hf_moeprune.utils import atomic_output_dir, parse_args, positionals_to_flags

    argv = positionals_to_flags(argv, ("--model",))
    (args,) = parse_args((PruneCLIArguments,), argv, prog="hf-moeprune prune")
    keep = _read_plan(args)
    if keep and args.streaming:
        from hf_moeprune.streaming import StreamingUnsupported, prune_checkpoint

        try:
            skeleton = prune_checkpoint(args.model, keep, args.output_dir, args.export_stock, args.max_shard_size)
        except StreamingUnsupported as exc:
            logger.warning("loading the whole model instead of streaming: %s", exc)
        else:
            counts = skeleton.config.experts_per_layer
            logger.info("saved pruned model to %s (experts per layer %s)", args.output_dir, counts)
            print(json.dumps({"output_dir": args.output_dir, "experts_per_layer": counts}))
            return 0
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = None
    if keep is None:
        from hf_moeprune.data import calibration_blocks
        from hf_moeprune.oneshot import collect_statistics, plan_oneshot

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        ids = calibration_blocks(args.data, tokenizer, args.text_field, args.block_size, args.max_blocks)
        batches = [{"input_ids": ids[i : i + args.batch_size]} for i in range(0, len(ids), args.batch_size)]
        stats = collect_statistics(model, batches, saliency=args.criterion == "saliency")
        keep = plan_oneshot(model, stats, args.criterion, args.target, args.allocation,
                            min_experts=args.min_experts, multiple_of=args.multiple_of)  # fmt: skip
    if keep:
        prune_experts(model, keep)
    else:
        logger.warning("nothing to remove: the model keeps all its experts")
    counts = getattr(model.config, "experts_per_layer", None)
    with atomic_output_dir(args.output_dir) as tmp:
        model.save_pretrained(tmp, export_stock=args.export_stock)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved pruned model to %s (experts per layer %s)", args.output_dir, counts)
    print(json.dumps({"output_dir": args.output_dir, "experts_per_layer": counts}))
    return 0


def _resolve(target: str) -> Callable[[Sequence[str]], int]:
    module, _, func = target.partition(":")
    return getattr(import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-moeprune",
        description="Prune, balance, compress and serve Mixture-of-Experts models with Hugging Face Transformers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n"
        + "\n".join(f"  {c.name:<10} {c.help}" for c in COMMANDS.values())
        + "\n\nRun `hf-moeprune SUBCOMMAND --help` for its options.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="SUBCOMMAND", help=", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the subcommand")
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(_resolve(COMMANDS[ns.command].target)(ns.args) or 0)


if __name__ == "__main__":
    sys.exit(main())
