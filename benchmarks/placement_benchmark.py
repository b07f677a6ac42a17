"""Expert placement for expert parallelism: balancedness before/after, greedy packing vs the full planner.

    python benchmarks/placement_benchmark.py                         # SYNTHETIC Zipf loads (labelled as such)
    python benchmarks/placement_benchmark.py --loads loads.pt        # measured routing counts
    python benchmarks/placement_benchmark.py --ep_sizes 2 4 8 16     # other expert-parallel sizes

``--loads`` takes a ``torch.save``d ``[layers, experts]`` tensor of routing counts, a list of 1-D tensors or a
``{layer: 1-D tensor}`` dict (what ``hf_moeprune.balancing.loads.measure_expert_loads`` returns). Without it,
the script draws token counts from Zipf expert popularities (a fixed seed, ranks shuffled per layer).

Balancedness = mean device load / max device load, per layer; the tables give the mean (and the worst layer)
over layers. ``bound`` is ``mean / peak_lower_bound``: no equal-count split can beat it. Replicas use
``num_redundant = ep_size`` extra slots. Times are process CPU seconds (the machine may be shared).

Writes ``benchmarks/results/placement.json`` and ``placement.md``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_moeprune.balancing import peak_lower_bound, plan_placement
from hf_moeprune.commands import parse_args

logger = logging.getLogger("placement_benchmark")


@dataclass
class BenchArguments:
    loads: str | None = field(
        default=None, metadata={"help": ".pt file of routing counts; default: synthetic Zipf loads (labelled)"}
    )
    ep_sizes: list[int] = field(default_factory=lambda: [2, 4, 8], metadata={"help": "expert-parallel sizes"})
    replicas: bool = field(default=True, metadata={"help": "also plan with num_redundant = ep_size replica slots"})
    speed: bool = field(default=True, metadata={"help": "time a 64-layer x 256-expert plan at ep_size 32"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic loads"})
    output_dir: str = field(default="benchmarks/results", metadata={"help": "where placement.json/.md go"})

    def __post_init__(self):
        bad = [e for e in self.ep_sizes if e < 1]
        if bad or not self.ep_sizes:
            raise ValueError(f"ep_sizes={self.ep_sizes}: give one or more integers >= 1")
        if self.loads is not None and not Path(self.loads).is_file():
            raise ValueError(f"--loads {self.loads!r} is not a file")


def zipf_counts(layers: int, experts: int, exponent: float, tokens: int, top_k: int, seed: int) -> torch.Tensor:
    """Routing counts [layers, experts]: popularity of the r-th most used expert ~ 1 / r^exponent."""
    g = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** exponent
    rows = []
    for _ in range(layers):
        p = popularity[torch.randperm(experts, generator=g)]
        rows.append(torch.bincount(torch.multinomial(p, tokens * top_k, True, generator=g), minlength=experts))
    return torch.stack(rows).double()


def load_matrices(args: BenchArguments) -> list[tuple[str, object]]:
    if args.loads is not None:
        loads = torch.load(args.loads, weights_only=True)
        return [(f"measured: {args.loads}", loads)]
    return [
        (f"SYNTHETIC Zipf s={s}, {layers} layers x {experts} experts", zipf_counts(layers, experts, s, 8192, 2, seed))
        for seed, (s, layers, experts) in enumerate(
            [(0.5, 16, 64), (0.8, 16, 64), (1.2, 16, 64), (0.8, 8, 256)], start=args.seed
        )
    ]


def _rows(loads) -> list[torch.Tensor]:
    if isinstance(loads, dict):
        return [torch.as_tensor(v, dtype=torch.float64) for v in loads.values()]
    return [torch.as_tensor(v, dtype=torch.float64) for v in loads]


def _stats(values: list[float | None]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "min": None}
    return {"mean": sum(values) / len(values), "min": min(values)}


def _timed(fn, *args, **kwargs):
    start = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - start


def bench_matrix(label: str, loads, ep_sizes: list[int], replicas: bool) -> list[dict]:
    rows = _rows(loads)
    results = []
    for ep in ep_sizes:
        if any(len(r) % ep for r in rows):
            logger.warning("%s: skipping ep_size=%d (expert counts %s)", label, ep, sorted({len(r) for r in rows}))
            continue
        entry = {"loads": label, "ep_size": ep, "layers": len(rows), "experts": sorted({len(r) for r in rows})}
        greedy, entry["greedy_cpu_s"] = _timed(plan_placement, loads, ep, method="greedy")
        full, entry["full_cpu_s"] = _timed(plan_placement, loads, ep, method="full")
        entry["before"] = _stats(full.balancedness_before)
        entry["greedy"] = _stats(greedy.balancedness_after)
        entry["full"] = _stats(full.balancedness_after)
        entry["bound"] = _stats([float(r.sum()) / ep / peak_lower_bound(r, ep) if r.sum() > 0 else 1.0 for r in rows])
        if replicas:
            rep_g, entry["greedy_replicas_cpu_s"] = _timed(plan_placement, loads, ep, ep, method="greedy")
            rep_f, entry["full_replicas_cpu_s"] = _timed(plan_placement, loads, ep, ep, method="full")
            entry["num_redundant"] = ep
            entry["greedy_replicas"] = _stats(rep_g.balancedness_replicated)
            entry["full_replicas"] = _stats(rep_f.balancedness_replicated)
        results.append(entry)
        logger.info("%s ep=%d: %s", label, ep, {k: v for k, v in entry.items() if isinstance(v, dict)})
    return results


def bench_speed() -> list[dict]:
    """The size the planner must handle in seconds: DeepSeek-V3-like 256 experts, 64 layers, ep_size 32."""
    g = torch.Generator().manual_seed(123)
    matrices = {
        "SYNTHETIC Zipf s=0.5, 64 layers x 256 experts": zipf_counts(64, 256, 0.5, 8192, 8, seed=123),
        "SYNTHETIC lognormal sigma=1, 64 layers x 256 experts": torch.exp(
            torch.randn(64, 256, generator=g, dtype=torch.float64)
        ),
    }
    results = []
    for label, loads in matrices.items():
        out = {"loads": label, "ep_size": 32}
        for method in ("greedy", "full"):
            plan, out[f"{method}_cpu_s"] = _timed(plan_placement, loads, 32, method=method)
            out[f"{method}_mean_balancedness"] = plan.summary()["mean_balancedness_after"]
            plan, out[f"{method}_replicas_cpu_s"] = _timed(plan_placement, loads, 32, 32, method=method)
            out[f"{method}_replicas_mean_balancedness"] = plan.summary()["mean_balancedness_replicated"]
        out["mean_balancedness_before"] = plan.summary()["mean_balancedness_before"]
        bounds = [float(r.sum()) / 32 / peak_lower_bound(r, 32) for r in loads]
        out["mean_bound"] = sum(bounds) / len(bounds)
        results.append(out)
    return results


def _f(stats: dict | None) -> str:
    if not stats or stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.4f} ({stats['min']:.3f})"


def to_markdown(record: dict) -> str:
    lines = [
        "# Expert placement benchmark (expert parallelism)",
        "",
        "```",
        record["command"],
        "```",
        "",
        f"- loads: {'; '.join(record['matrices'])}",
        "- balancedness = mean device load / max device load per layer; cells: mean over layers (worst layer)",
        "- greedy = DeepSeek-EPLB-style balanced packing only; full = greedy and Karmarkar-Karp differencing starts,"
        " each refined by swap search (`hf_moeprune.balancing.plan_placement`)",
        "- bound = mean / lower bound on the peak (heaviest expert plus the lightest others its device must hold,"
        " or the mean): no equal-count split can exceed it",
        "- replicas: num_redundant = ep_size extra slots per layer, copies share their expert's load evenly",
        f"- {record['environment']}; CPU seconds are process time for all layers",
        "",
        "| loads | ep | before | greedy | full | bound | greedy + replicas | full + replicas | greedy s | full s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['loads']} | {r['ep_size']} | {_f(r['before'])} | {_f(r['greedy'])} | {_f(r['full'])} | "
            f"{_f(r['bound'])} | {_f(r.get('greedy_replicas'))} | {_f(r.get('full_replicas'))} | "
            f"{r['greedy_cpu_s']:.2f} | {r['full_cpu_s']:.2f} |"
        )
    for speed in record.get("speed") or []:
        lines += [
            "",
            f"Speed, {speed['loads']}, ep_size {speed['ep_size']} (process CPU seconds, whole matrix; before "
            f"placement mean balancedness {speed['mean_balancedness_before']:.4f}, bound without replicas "
            f"{speed['mean_bound']:.4f}):",
            "",
            "| method | CPU s | mean balancedness | CPU s, 32 replicas | mean balancedness, replicas |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in ("greedy", "full"):
            lines.append(
                f"| {m} | {speed[f'{m}_cpu_s']:.2f} | {speed[f'{m}_mean_balancedness']:.4f} | "
                f"{speed[f'{m}_replicas_cpu_s']:.2f} | {speed[f'{m}_replicas_mean_balancedness']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    (args,) = parse_args((BenchArguments,), argv, "placement_benchmark")
    torch.set_num_threads(1)
    matrices = load_matrices(args)
    results = []
    for label, loads in matrices:
        results.extend(bench_matrix(label, loads, args.ep_sizes, args.replicas))
    record = {
        "command": " ".join(["python benchmarks/placement_benchmark.py", *argv]),
        "matrices": [label for label, _ in matrices],
        "environment": (
            f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}"
        ),
        "results": results,
        "speed": bench_speed() if args.speed else None,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "placement.json", json.dumps(record, indent=1))
    _write(out / "placement.md", to_markdown(record))
    print(to_markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
