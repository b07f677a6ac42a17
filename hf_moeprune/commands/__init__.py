"""``hf-moeprune``: one console script, one subcommand per stage of the pipeline.

Each subcommand is a module of this package holding its argument dataclasses (parsed with
``HfArgumentParser``, so ``--help`` lists every field with its help text and a YAML recipe can fill them) and
its ``main(argv) -> int``; this file registers them and runs the one asked for. The library modules they call
hold no argument parsing and print nothing. Targets are ``"module:function"`` strings, imported only when
their subcommand runs, so ``hf-moeprune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module

from hf_moeprune.commands._parsing import parse_args, positionals_to_flags

logger = logging.getLogger("hf_moeprune")

__all__ = ["COMMANDS", "UsageError", "main", "parse_args", "positionals_to_flags", "register_command"]


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
    "demo", "run the whole pipeline on the built-in default (no downloads)", "hf_moeprune.commands.demo:main"
)
register_command("train", "fine-tune while pruning experts (MoEPruneTrainer)", "hf_moeprune.commands.train:main")
register_command(
    "balance", "reorder experts so expert-parallel ranks get equal load", "hf_moeprune.commands.balance:main"
)
register_command("quantize", "quantize weights (fused experts included) and save", "hf_moeprune.commands.quantize:main")
register_command("distill", "distil the unpruned teacher into a pruned student", "hf_moeprune.commands.distill:main")
register_command("generate", "batched generation from a JSONL file of prompts", "hf_moeprune.commands.generate:main")
register_command(
    "compress", "distill, quantize, write the card and push, from a YAML recipe", "hf_moeprune.commands.compress:main"
)
register_command(
    "prune", "one-shot pruning: REAP etc. on calibration data, or a plan", "hf_moeprune.commands.prune:main"
)
register_command("push", "push a model folder (and its model card) to the Hub", "hf_moeprune.commands.push:main")


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
