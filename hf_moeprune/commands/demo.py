"""``hf-moeprune demo``: the whole pipeline on the built-in default (no downloads), with its summary table.

``DemoArguments`` is the typed configuration of the pipeline (``hf_moeprune.demo.pipeline.run_demo``), so it
lives there; this module parses it and prints the result.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from hf_moeprune.commands._parsing import parse_args


def _table(rows: list[dict]) -> str:
    header = (
        f"{'stage':<22}{'experts':>8}{'size MB':>9}{'prose loss':>11}{'prose ppl':>10}{'code loss':>10}{'time s':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['stage']:<22}{r['routed_experts']:>8}{r['bytes'] / 1e6:>9.2f}{r['prose_loss']:>11.3f}"
            f"{math.exp(min(r['prose_loss'], 50)):>10.1f}{r['code_loss']:>10.3f}{r['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    from hf_moeprune.demo.pipeline import DemoArguments, run_demo
    from hf_moeprune.utils import atomic_output_dir

    (args,) = parse_args((DemoArguments,), argv, prog="hf-moeprune demo")
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        summary = run_demo(args, Path(tmp))
        (Path(tmp) / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        for scratch in ("finetune", "distill"):
            shutil.rmtree(Path(tmp) / scratch, ignore_errors=True)
    print()
    print(_table(summary["stages"]))
    gen = summary["generation"]
    print(f"\ngenerated {gen['tokens']} tokens for {gen['prompts']} prompts in {gen['seconds']} s "
          f"({gen['tokens_per_s']} tokens/s)")  # fmt: skip
    for sample in gen["samples"]:
        print(f"  {sample['prompt']!r} -> {sample['completion']!r}")
    print(f"\npushed to {summary['hub']['url']} ({len(summary['hub']['files'])} files) and reloaded; "
          f"total {summary['total_seconds']} s; everything is in {args.output_dir}/")  # fmt: skip
    return 0
