"""``hf-moeprune balance``: measure expert loads on calibration data, reorder experts for expert parallelism."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class BalanceArguments:
    model: str = field(metadata={"help": "Model folder or Hub id."})
    output_dir: str = field(metadata={"help": "Where to save the rebalanced model (must be new or empty)."})
    data: str = field(metadata={"help": "Calibration text: a saved dataset, .jsonl, a text file or a folder."})
    ep_size: int = field(default=2, metadata={"help": "Expert-parallel size the placement is planned for."})
    num_redundant: int = field(
        default=0, metadata={"help": "Extra replica slots per layer (writes the vLLM EPLB maps; 0 = none)."}
    )
    text_field: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(default=128, metadata={"help": "Tokens per calibration block."})
    max_blocks: int = field(default=256, metadata={"help": "Calibration blocks to route (at most)."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass."})
    export_stock: bool = field(default=True, metadata={"help": "Stock architecture when counts are uniform."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty output_dir (once the new one is complete)."}
    )

    def __post_init__(self):
        for name in ("ep_size", "block_size", "max_blocks", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_redundant < 0:
            raise ValueError(f"num_redundant={self.num_redundant} must be >= 0")


def _fmt(value: float | None, width: int = 8) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def main(argv: Sequence[str]) -> int:
    from transformers import AutoTokenizer

    from hf_moeprune.balancing.loads import measure_expert_loads, rebalance_for_expert_parallel
    from hf_moeprune.commands._parsing import parse_args, positionals_to_flags
    from hf_moeprune.data import calibration_blocks
    from hf_moeprune.loading import load_model, save_processor
    from hf_moeprune.utils import atomic_output_dir, check_output_folder

    (args,) = parse_args((BalanceArguments,), positionals_to_flags(argv, ("--model",)), prog="hf-moeprune balance")
    check_output_folder(args.output_dir, args.overwrite)  # before anything is read
    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = calibration_blocks(args.data, tokenizer, args.text_field, args.block_size, args.max_blocks)
    model = load_model(args.model)
    batches = [{"input_ids": ids[i : i + args.batch_size]} for i in range(0, len(ids), args.batch_size)]
    loads = measure_expert_loads(model, batches)
    plan = rebalance_for_expert_parallel(model, loads, args.ep_size, args.num_redundant)
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp, export_stock=args.export_stock)
        save_processor(args.model, tmp)
        # replica maps renumbered to the saved (permuted) expert order, which is what an engine reads
        record = plan.for_permuted_checkpoint().to_dict()
        record["loads"] = {layer: load.tolist() for layer, load in loads.items()}  # in the original numbering
        # what the loads were measured on, so that a check under expert parallelism can route the same tokens
        record["calibration"] = {
            "data": str(Path(args.data).resolve()), "text_field": args.text_field,
            "block_size": args.block_size, "blocks": len(ids),
        }  # fmt: skip
        (tmp / "placement.json").write_text(json.dumps(record, indent=1))
    print(f"expert placement for ep_size={args.ep_size} ({len(ids)} calibration blocks of {args.block_size})")
    print(
        f"{'layer':>5} {'experts':>7} {'before':>8} {'after':>8}" + (f" {'replicas':>9}" if args.num_redundant else "")
    )
    for i, layer in enumerate(plan.layer_ids):
        before, after = _fmt(plan.balancedness_before[i]), _fmt(plan.balancedness_after[i])
        row = f"{layer:>5} {plan.num_experts[i]:>7} {before} {after}"
        if args.num_redundant:
            row += f" {_fmt(plan.balancedness_replicated[i], 9)}"
        print(row)
    summary = plan.summary()
    print(f"{'mean':>5} {'':>7} {_fmt(summary['mean_balancedness_before'])} {_fmt(summary['mean_balancedness_after'])}")
    print(f"saved to {args.output_dir} (placement.json holds the plan and the measured loads)")
    return 0
