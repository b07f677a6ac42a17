"""Forward+backward time of the demo MoE with and without hf_moeprune's routing instrumentation, no Trainer.

Isolates the cost of the router hooks (and the per-expert output path used by REAP) from everything else the
Trainer does; configurations are interleaved and repeated because this shared 2-core machine is noisy.

    python benchmarks/instrumentation_overhead.py    # writes benchmarks/results/instrumentation_overhead.{json,md}
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_moeprune  # noqa: F401
from hf_moeprune.adapters import get_adapter
from hf_moeprune.balancing.router import heterogeneous_load_balancing_loss
from hf_moeprune.demo import load_or_train_base_model
from hf_moeprune.observation import RoutingInstrumentation
from hf_moeprune.pruning.statistics import ExpertStatistics

OUT = Path(__file__).parent / "results" / "instrumentation_overhead"


def main(rounds: int = 4, steps: int = 6) -> None:
    model = AutoModelForCausalLM.from_pretrained(load_or_train_base_model())
    model.train()
    adapter = get_adapter(model)
    ids = torch.randint(0, model.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    stats = ExpertStatistics(
        {i: adapter.num_experts(adapter.decoder_layers(model)[i]) for i in adapter.moe_layer_indices(model)}
    )

    def stock():
        model(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()

    def instrumented(inst):
        def run():
            out = model(input_ids=ids, labels=ids, output_router_logits=False)
            aux = heterogeneous_load_balancing_loss(inst.take_router_logits(), 2, None, adapter.scores)
            (out.loss + 0.01 * aux).backward()

        return run

    times = {"stock (model's own aux loss)": [], "router hooks only": [], "router hooks + REAP outputs": []}
    for _ in range(rounds):
        for name in times:
            inst = None
            if name != "stock (model's own aux loss)":
                inst = RoutingInstrumentation(model, adapter, stats, record_reap=name.endswith("REAP outputs"))
                inst.attach()
                inst.recording = inst.capture_logits = True
            fn = stock if inst is None else instrumented(inst)
            fn()
            model.zero_grad()
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                model.zero_grad()
                times[name].append(time.perf_counter() - start)
            if inst is not None:
                inst.detach()
    base = statistics.median(times["stock (model's own aux loss)"])
    result = {
        "command": "python " + " ".join(sys.argv),
        "batch": "16 x 128 tokens",
        "median_ms": {k: statistics.median(v) * 1000 for k, v in times.items()},
        "overhead": {k: statistics.median(v) / base - 1 for k, v in times.items()},
        "spread_ms": {k: [min(v) * 1000, max(v) * 1000] for k, v in times.items()},
    }
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Routing instrumentation overhead (forward + backward, no Trainer)",
        "",
        f"Command: `{result['command']}`",
        "",
        "| configuration | median ms | min-max ms | vs stock |",
        "|---|---|---|---|",
    ]
    for k in times:
        lo, hi = result["spread_ms"][k]
        lines.append(
            f"| {k} | {result['median_ms'][k]:.0f} | {lo:.0f}-{hi:.0f} | {result['overhead'][k] * 100:+.1f}% |"
        )
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved repetitions of every configuration")
    parser.add_argument("--steps", type=int, default=6, help="forward+backward steps timed per repetition")
    cli = parser.parse_args()
    main(cli.rounds, cli.steps)
