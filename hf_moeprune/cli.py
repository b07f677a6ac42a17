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
register_command("prune", "prune experts of a model one-shot and save it", "hf_moeprune.cli:prune_main")
register_command("push", "push a model folder (and its model card) to the Hub", "hf_moeprune.hub:push_main")


@dataclass
class PruneCLIArguments:
    model: str = field(metadata={"help": "model path or Hub id"})
    output_dir: str = field(metadata={"help": "where to save the pruned model"})
    keep: str = field(
        metadata={"help": "JSON object mapping layer index to the expert indices to keep, e.g. '{\"0\": [0, 2, 5]}'"}
    )
    export_stock: bool = field(
        default=True, metadata={"help": "write the stock architecture when every layer keeps the same count"}
    )


def prune_main(argv: Sequence[str]) -> int:
    import json

    from transformers import AutoModelForCausalLM

    from hf_moeprune.surgery import prune_experts
    from hf_moeprune.utils import atomic_output_dir, parse_args

    (args,) = parse_args((PruneCLIArguments,), argv, prog="hf-moeprune prune")
    try:
        keep = {int(k): v for k, v in json.loads(args.keep).items()}
    except (json.JSONDecodeError, AttributeError, ValueError) as exc:
        raise SystemExit(f"--keep {args.keep!r} is not a JSON object of layer -> expert list: {exc}") from None
    model = AutoModelForCausalLM.from_pretrained(args.model)
    prune_experts(model, keep)
    with atomic_output_dir(args.output_dir) as tmp:
        model.save_pretrained(tmp, export_stock=args.export_stock)
    logger.info("saved pruned model to %s (experts per layer %s)", args.output_dir, model.config.experts_per_layer)
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
