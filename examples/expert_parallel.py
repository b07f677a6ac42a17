"""Run an original and a rebalanced MoE under transformers' expert parallelism and compare what each rank computes.

Rebalance first (measures loads on calibration text, reorders experts, writes placement.json):

    hf-moeprune balance MODEL --ep_size 2 --data calib.jsonl --output_dir rebalanced

then, on 2 processes (CPU/gloo or GPUs/nccl; --nproc_per_node must equal --ep_size):

    torchrun --nproc_per_node 2 examples/expert_parallel.py --original MODEL --rebalanced rebalanced

Both models are loaded with ``DistributedConfig(fsdp_size=2, ep_size=2)``: each rank holds a contiguous block of
every layer's experts and its own share of the calibration blocks (those ``balance`` measured, read from
placement.json); tokens reach their experts by all-to-all. The script counts the (token, expert) pairs each
rank's experts compute, prints them next to the device loads the plan predicted, and checks that the
rebalanced model's logits equal the original's. ``--report FILE`` writes everything as JSON.
"""

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moeprune.balancing.expert_parallel import RankExpertLoad, load_expert_parallel
from hf_moeprune.data import calibration_blocks

logger = logging.getLogger("expert_parallel")


def run(path: str, blocks: torch.Tensor, batch_size: int, ep_size: int):
    """Per-rank pairs ``[world, layers]``, the MoE layer ids, and this rank's logits for its blocks."""
    model = load_expert_parallel(path, ep_size=ep_size).eval()
    with RankExpertLoad(model) as load:
        logits = forward(model, blocks, batch_size)
    return load.gather(), load.layers, logits


@torch.no_grad()
def forward(model, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    batches = (blocks[i : i + batch_size].to(device) for i in range(0, len(blocks), batch_size))
    return torch.cat([model(batch).logits.cpu() for batch in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", required=True, help="the model before `hf-moeprune balance`")
    parser.add_argument("--rebalanced", required=True, help="the output folder of `hf-moeprune balance`")
    parser.add_argument("--batch_size", type=int, default=8, help="blocks per forward on each rank")
    parser.add_argument("--report", default=None, help="write the results to this JSON file (rank 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # transformers reuses it
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = dist.get_rank(), dist.get_world_size()

    placement = json.loads((Path(args.rebalanced) / "placement.json").read_text())
    calibration, ep_size = placement.get("calibration"), placement["ep_size"]
    if calibration is None:
        raise SystemExit(f"{args.rebalanced}/placement.json records no calibration data; rerun `hf-moeprune balance`")
    if world != ep_size:
        raise SystemExit(f"{args.rebalanced} was balanced for ep_size={ep_size}; run with --nproc_per_node {ep_size}")
    tokenizer = AutoTokenizer.from_pretrained(args.rebalanced)
    blocks = calibration_blocks(
        calibration["data"], tokenizer, calibration["text_field"], calibration["block_size"], calibration["blocks"]
    )
    local = blocks[rank::world]  # each rank routes its own share; together they cover what `balance` measured
    before, layers, original_logits = run(args.original, local, args.batch_size, ep_size)
    after, _, rebalanced_logits = run(args.rebalanced, local, args.batch_size, ep_size)
    # the same tokens through the unsharded original model, on this rank alone
    device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
    single = forward(AutoModelForCausalLM.from_pretrained(args.original).to(device).eval(), local, args.batch_size)
    diffs = torch.tensor(
        [(rebalanced_logits - original_logits).abs().max(), (rebalanced_logits - single).abs().max()], device=device
    )
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)

    planned = {layer: i for i, layer in enumerate(placement["layer_ids"])}
    report = {"ep_size": ep_size, "world_size": world, "blocks": len(blocks), "layers": []}
    for column, layer in enumerate(layers):
        i = planned[layer]
        row = {
            "layer": layer,
            "measured_before": before[:, column].tolist(),
            "planned_before": placement["device_loads_before"][i],
            "measured_after": after[:, column].tolist(),
            "planned_after": placement["device_loads_after"][i],
        }
        for key in ("measured_before", "measured_after"):
            loads = row[key]
            row[key.replace("measured", "balancedness")] = sum(loads) / len(loads) / max(loads) if max(loads) else 1.0
        report["layers"].append(row)
    report["max_abs_logit_diff_rebalanced_vs_original_ep"] = float(diffs[0])
    report["max_abs_logit_diff_rebalanced_ep_vs_original_single_process"] = float(diffs[1])

    if rank == 0:
        logger.info("pairs computed per rank (measured under DistributedConfig(ep_size=%d)) vs the plan", ep_size)
        logger.info("%5s  %-22s %-22s %-22s %-22s", "layer", "before", "planned", "after", "planned")
        for row in report["layers"]:
            logger.info(
                "%5d  %-22s %-22s %-22s %-22s", row["layer"], row["measured_before"],
                [int(v) for v in row["planned_before"]], row["measured_after"], [int(v) for v in row["planned_after"]],
            )  # fmt: skip
        logger.info("max |logits rebalanced - original| under EP: %.3g", diffs[0])
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
