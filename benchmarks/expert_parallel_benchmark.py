"""Per-rank expert load of the trained demo MoE inside transformers' expert parallelism, before and after
`hf-moeprune balance`, at several ep_size values (CPU, gloo; one process per rank).

python benchmarks/expert_parallel_benchmark.py [--ep_sizes 2 4 8] [--out_dir benchmarks/results]

For each ep_size: `hf-moeprune balance` on held-out prose + code of the demo corpus (256 blocks of 128
tokens), then `torchrun --nproc_per_node ep_size examples/expert_parallel.py`, which loads the original and
the rebalanced model with DistributedConfig(ep_size) and counts the (token, expert) pairs each rank's experts
compute. Writes expert_parallel.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from hf_moeprune.balancing import peak_lower_bound
from hf_moeprune.commands import main as cli
from hf_moeprune.demo import build_corpus, load_or_train_base_model

ROOT = Path(__file__).resolve().parent.parent


def held_out_jsonl(path: Path) -> None:
    corpus = build_corpus()
    rows = [{"text": row["text"]} for domain in ("prose", "code") for row in corpus[domain]["validation"]]
    path.write_text("\n".join(json.dumps(r) for r in rows))


def exhaustive_best(loads: list[float], bins: int) -> float:
    """The best balancedness of any equal-count split, by depth-first search (heaviest expert first, ranks
    with the same load and count are interchangeable, branches that cannot beat the best so far are cut)."""
    items = sorted(loads, reverse=True)
    per_bin = len(items) // bins
    best = [float("inf")]

    def place(i: int, totals: list[float], counts: list[int]) -> None:
        if i == len(items):
            best[0] = min(best[0], max(totals))
            return
        seen = set()
        for b in range(bins):
            if counts[b] == per_bin or (totals[b], counts[b]) in seen:
                continue
            seen.add((totals[b], counts[b]))
            if totals[b] + items[i] >= best[0]:
                continue
            totals[b] += items[i]
            counts[b] += 1
            place(i + 1, totals, counts)
            totals[b] -= items[i]
            counts[b] -= 1

    place(0, [0.0] * bins, [0] * bins)
    return sum(items) / bins / best[0] if best[0] else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep_sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--max_blocks", type=int, default=256)
    parser.add_argument("--exhaustive_up_to", type=int, default=16, help="exact optimum for layers this small")
    parser.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    model = load_or_train_base_model()
    AutoTokenizer.from_pretrained(model)  # fail early if the cache is incomplete
    results = {"command": "python benchmarks/expert_parallel_benchmark.py " + " ".join(sys.argv[1:]), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        held_out_jsonl(tmp / "held_out.jsonl")
        for ep in args.ep_sizes:
            out = tmp / f"ep{ep}"
            cli(["balance", str(model), "--output_dir", str(out), "--data", str(tmp / "held_out.jsonl"),
                 "--ep_size", str(ep), "--block_size", "128", "--max_blocks", str(args.max_blocks)])  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ep),
                 str(ROOT / "examples" / "expert_parallel.py"), "--original", str(model), "--rebalanced", str(out),
                 "--report", str(tmp / f"report{ep}.json")],
                check=True, env=env,
            )  # fmt: skip
            report = json.loads((tmp / f"report{ep}.json").read_text())
            placement = json.loads((out / "placement.json").read_text())
            for row in report["layers"]:  # the best any equal-count split (no replicas) can reach
                loads = placement["loads"][str(row["layer"])]
                row["balancedness_bound"] = sum(loads) / ep / peak_lower_bound(loads, ep)
                if len(loads) <= args.exhaustive_up_to:
                    row["balancedness_optimum"] = exhaustive_best(loads, ep)
            report["seconds"] = round(time.perf_counter() - start, 1)
            report["planned_exactly"] = all(
                row[f"measured_{k}"] == [int(v) for v in row[f"planned_{k}"]]
                for row in report["layers"]
                for k in ("before", "after")
            )
            results["runs"].append(report)

    out_dir = Path(args.out_dir)
    (out_dir / "expert_parallel.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Demo MoE under transformers expert parallelism (DistributedConfig(ep_size), CPU gloo)",
        "",
        f"Command: `{results['command']}`",
        "",
        "Model: the demo's pretrained 7M Mixtral (4 layers x 16 experts, top-2). Tokens: held-out prose + code of",
        f"the stdlib corpus, {results['runs'][0]['blocks']} blocks of 128, split over the ranks. Pairs = (token,",
        "expert) pairs each rank's experts computed, counted on the experts kernel inside the EP engine.",
        "Balancedness = mean rank load / max rank load. `planned` = the measured counts equal the plan's device",
        "loads exactly, for every layer and rank. `optimum` = the best balancedness any equal-count split reaches",
        "(exhaustive search); `bound` = mean / peak lower bound, an upper bound on it. When one expert alone",
        "exceeds a rank's fair share only replicas help, and transformers' EP has none (vLLM EPLB does: see",
        "placement_demo_model/placement.md).",
        "",
        "| ep_size | layer | pairs per rank before | after | balancedness before | after | optimum | bound | planned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        for row in run["layers"]:
            lines.append(
                f"| {run['ep_size']} | {row['layer']} | {row['measured_before']} | {row['measured_after']} | "
                f"{row['balancedness_before']:.3f} | {row['balancedness_after']:.3f} | "
                f"{row.get('balancedness_optimum', float('nan')):.3f} | {row['balancedness_bound']:.3f} | "
                f"{run['planned_exactly']} |"
            )
    lines += [
        "",
        "| ep_size | mean balancedness before | after | hottest rank's pairs before | after | "
        "max abs logit diff (rebalanced EP vs original, 1 process) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        rows = run["layers"]
        before = sum(r["balancedness_before"] for r in rows) / len(rows)
        after = sum(r["balancedness_after"] for r in rows) / len(rows)
        peak_before = sum(max(r["measured_before"]) for r in rows)
        peak_after = sum(max(r["measured_after"]) for r in rows)
        diff = run["max_abs_logit_diff_rebalanced_ep_vs_original_single_process"]
        lines.append(
            f"| {run['ep_size']} | {before:.3f} | {after:.3f} | {peak_before} | {peak_after} "
            f"({peak_after / peak_before - 1:+.1%}) | {diff:.2g} | {run['seconds']} |"
        )
    (out_dir / "expert_parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
