"""``hf-moeprune``: one console script, one subcommand per stage of the pipeline.

Each subcommand is a registry entry: its argument dataclasses (parsed with ``HfArgumentParser``, so
``--help`` lists every field with its help text and a YAML recipe can fill them) and the function that
runs it. A subcommand's implementation lives in the module of its concern; this file only wires them.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

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
    data: str | None = field(
        default=None,
        metadata={"help": "one-shot pruning from statistics on this calibration text (a saved dataset, .jsonl, "
                  "a text file or a folder); give either --keep or --data"},
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
    overwrite: bool = field(
        default=False, metadata={"help": "replace a non-empty output_dir (once the new one is complete)"}
    )

    def __post_init__(self):
        from hf_moeprune.pruning.allocation import AllocationSpec
        from hf_moeprune.pruning.criteria import get_criterion

        if (self.keep is None) == (self.data is None):
            raise ValueError(
                f"give exactly one of --keep (an explicit plan) or --data (one-shot from statistics); "
                f"got keep={self.keep!r}, data={self.data!r}"
            )
        get_criterion(self.criterion)  # names the known criteria
        AllocationSpec(self.allocation)
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target={self.target} must be in [0, 1)")
        for name in ("multiple_of", "block_size", "max_blocks", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.min_experts is not None and self.min_experts < 1:
            raise ValueError(f"min_experts={self.min_experts} must be >= 1")
        self.plan = parse_keep(self.keep) if self.keep is not None else None


def parse_keep(text: str) -> dict[int, list[int]]:
    """``--keep`` as ``{layer: [expert, ...]}``; anything but a JSON object of integer layer keys to non-empty lists
    of distinct integers is refused, naming the offending part (0.5 is not expert 0)."""
    import json

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--keep {text!r} is not JSON ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--keep {text!r} must be a non-empty JSON object of layer -> expert indices")
    plan = {}
    for key, experts in raw.items():
        if not key.strip().isdigit():
            raise ValueError(f"--keep: layer key {key!r} is not a layer index (a non-negative integer)")
        bad = [e for e in experts if isinstance(e, bool) or not isinstance(e, int)] if isinstance(experts, list) else 1
        if bad or not experts:
            raise ValueError(
                f"--keep: layer {key} needs a non-empty list of integer expert indices, got {experts!r}"
                + (f" ({bad} not integers)" if isinstance(bad, list) else "")
            )
        if len(set(experts)) != len(experts):
            raise ValueError(f"--keep: layer {key} lists an expert twice: {experts}")
        plan[int(key)] = experts
    return plan


def check_top_k_fits(model) -> None:
    """A model whose top-k exceeds a layer's expert count cannot route; say so now, not at generation."""
    from hf_moeprune.adapters import get_adapter

    adapter = get_adapter(model)
    top_k = adapter.top_k(model.config)
    layers = adapter.decoder_layers(model)
    for index in adapter.moe_layer_indices(model):
        count = adapter.num_experts(layers[index])
        if top_k > count:
            raise ValueError(
                f"num_experts_per_tok (top-k)={top_k} is larger than the {count} experts of layer {index}; "
                "fix the model's config.json"
            )


def prune_main(argv: Sequence[str]) -> int:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_moeprune.surgery import prune_experts
    from hf_moeprune.utils import atomic_output_dir, check_output_folder, parse_args, positionals_to_flags

    argv = positionals_to_flags(argv, ("--model",))
    (args,) = parse_args((PruneCLIArguments,), argv, prog="hf-moeprune prune")
    check_output_folder(args.output_dir, args.overwrite)  # before the model is read
    if args.data is not None and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data!r} does not exist")
    keep = args.plan
    tokenizer = ids = None
    if keep is None:  # the calibration data is read (and checked) before the model
        from hf_moeprune.data import calibration_blocks

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        ids = calibration_blocks(args.data, tokenizer, args.text_field, args.block_size, args.max_blocks)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    check_top_k_fits(model)
    if keep is None:
        from hf_moeprune.oneshot import collect_statistics, plan_oneshot

        batches = [{"input_ids": ids[i : i + args.batch_size]} for i in range(0, len(ids), args.batch_size)]
        stats = collect_statistics(model, batches, saliency=args.criterion == "saliency")
        keep = plan_oneshot(model, stats, args.criterion, args.target, args.allocation,
                            min_experts=args.min_experts, multiple_of=args.multiple_of)  # fmt: skip
    if keep:
        prune_experts(model, keep)
    else:
        logger.warning("nothing to remove: the model keeps all its experts")
    counts = getattr(model.config, "experts_per_layer", None)
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp, export_stock=args.export_stock)  # generation_config.json comes along
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            from hf_moeprune.quantization.cli import copy_tokenizer

            copy_tokenizer(args.model, tmp)  # so that `generate` and `push` work on the output as on the input
    logger.info("saved pruned model to %s (experts per layer %s)", args.output_dir, counts)
    print(json.dumps({"output_dir": args.output_dir, "experts_per_layer": counts}))
    return 0


def _resolve(target: str) -> Callable[[Sequence[str]], int]:
    module, _, func = target.partition(":")
    return getattr(import_module(module), func)


class UsageError(SystemExit):
    """Ends a subcommand with exit code 2 after its one-line message was printed; ``str()`` is the message."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


# Errors that mean "this input cannot be used" (a value, a path, a file's content): one line, exit code 2.
# Anything else is a bug and keeps its traceback.
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes UnicodeDecodeError, json.JSONDecodeError, CheckpointError, huggingface_hub's validation
    OSError,  # a missing or unreadable path, a model folder transformers cannot load, a full disk
)


def _one_line(command: str, message: str) -> str:
    message = " ".join(str(message).split())
    for prefix in (f"hf-moeprune {command}: error: ", f"hf-moeprune {command}: "):
        message = message.removeprefix(prefix)
    return f"hf-moeprune {command}: error: {message}"


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
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of any error")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="SUBCOMMAND", help=", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the subcommand")
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(_resolve(COMMANDS[ns.command].target)(ns.args) or 0)
    except UsageError:
        raise
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # argparse (exit code 2, message already printed) or an exit code
            raise
        message = _one_line(ns.command, exc.code)
    except USAGE_ERRORS as exc:
        if ns.debug:
            raise
        message = _one_line(ns.command, exc)
    except pickle.UnpicklingError as exc:
        # torch.load(weights_only=True) met a pickle that is more than tensors and plain containers
        if ns.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = _one_line(
            ns.command, f"refused to unpickle a file (weights_only loading; nothing in it ran): {first}"
        )
    print(message, file=sys.stderr)
    raise UsageError(message)


if __name__ == "__main__":
    sys.exit(main())
