"""``hf-moeprune compress RECIPE.yaml``: distill -> quantize -> model card -> push, each step optional.

The recipe's fields are ``CompressArguments``, the typed configuration of the library's ``compress`` chain
(``hf_moeprune.compress``), so a YAML recipe and a Python caller describe a run the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from hf_moeprune.commands._parsing import parse_args
from hf_moeprune.compress import CompressArguments, compress


def main(argv: Sequence[str]) -> int:
    (args,) = parse_args((CompressArguments,), argv, prog="hf-moeprune compress")
    summary = compress(args)
    print(json.dumps(summary, indent=2))
    return 0
