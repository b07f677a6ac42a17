"""Argument parsing shared by the subcommands: ``HfArgumentParser`` over their dataclasses, YAML recipes,
leading positionals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hf_moeprune import compat


def positionals_to_flags(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """Map leading positional arguments to flags (HfArgumentParser only knows flags): with
    ``names=("--model", "--output_dir")``, ``MODEL OUT --x 1`` becomes ``--model MODEL --output_dir OUT --x 1``.
    A leading YAML recipe stays first; flags given as flags are left alone."""
    argv = list(argv)
    head = []
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        head, argv = [argv[0]], argv[1:]
    names = list(names)
    mapped = []
    while argv and names and not argv[0].startswith("-"):
        mapped += [names.pop(0), argv.pop(0)]
    return head + mapped + argv


def parse_args(dataclass_types: tuple[type, ...], argv: Sequence[str], prog: str):
    """Parse ``argv`` into ``dataclass_types`` with ``HfArgumentParser``.

    ``argv`` may be flags, a single YAML recipe (``recipe.yaml``), or a recipe followed by flags that
    override it (``recipe.yaml --learning_rate 1e-4``).
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, prog=prog)
    # An argument error prints one line (prog: error: ...), not the usage of every TrainingArguments flag.
    parser.print_usage = lambda file=None: None
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        import yaml

        recipe_path = Path(argv[0])
        if not recipe_path.is_file():
            parser.error(f"recipe {str(recipe_path)!r} does not exist")
        recipe = yaml.safe_load(recipe_path.read_text()) or {}
        if not isinstance(recipe, dict):
            parser.error(f"recipe {str(recipe_path)!r} must be a mapping of field: value, got {type(recipe).__name__}")
        known = {f for t in dataclass_types for f in t.__dataclass_fields__}
        unknown = sorted(set(recipe) - known)
        if unknown:
            parser.error(f"recipe {str(recipe_path)!r} has unknown field(s) {unknown}")
        parser.set_defaults(**recipe)
        argv = argv[1:]
        # fields required by the dataclass but given in the recipe are no longer required on the CLI
        for action in compat.parser_actions(parser):
            if action.dest in recipe:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
