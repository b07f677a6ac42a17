"""Build the demo base model from a clean cache, time every stage, and measure whether its experts specialised.

    python benchmarks/expert_specialisation.py                      # fresh temporary cache, default recipe
    python benchmarks/expert_specialisation.py --cache_dir ~/.cache/hf_moeprune   # reuse / fill a cache
    python benchmarks/expert_specialisation.py --max_steps 100      # any BaseModelConfig field

Writes ``benchmarks/results/base_model.json``: stage times (wall and process CPU seconds, plus the machine's
load average, since a shared CPU stretches wall time), parameter count, held-out loss per domain against a
unigram baseline, and per layer the Jensen-Shannon divergence between code and prose expert usage and each
domain's normalised load entropy, for the trained model and for the same model at initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM

from hf_moeprune.commands import parse_args
from hf_moeprune.demo.base_model import (
    BUILD_INFO,
    BaseModelConfig,
    init_model,
    load_or_train_base_model,
    load_or_train_tokenizer,
    measure_domains,
    specialisation_report,
    token_counts,
    tokenize_and_pack,
)
from hf_moeprune.demo.corpus import build_corpus

logger = logging.getLogger("expert_specialisation")


@dataclass
class BenchArguments:
    cache_dir: str | None = field(
        default=None, metadata={"help": "cache root to use; default: a fresh temporary one (times a clean build)"}
    )
    output: str = field(default="benchmarks/results/base_model.json", metadata={"help": "results file"})
    report_blocks: int = field(default=256, metadata={"help": "held-out blocks per domain for this report"})


class _Stopwatch:
    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}

    def run(self, name, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        self.stages[name] = {
            "wall_s": round(time.perf_counter() - wall, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
        }
        logger.info("%s: %s", name, self.stages[name])
        return result


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bench, recipe = parse_args((BenchArguments, BaseModelConfig), sys.argv[1:] if argv is None else argv, "bench")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hf_moeprune-bench-") as fresh:
        cache_dir = bench.cache_dir or fresh
        watch = _Stopwatch()
        total = time.perf_counter()
        corpus = watch.run("corpus", build_corpus, cache_dir=cache_dir)
        tokenizer = watch.run("tokenizer", load_or_train_tokenizer, corpus, None, cache_dir)
        model_dir = watch.run("pack_pretrain_eval_save", load_or_train_base_model, recipe, None, None, cache_dir)
        total_s = round(time.perf_counter() - total, 2)
        load_after = os.getloadavg()
        info = json.loads((model_dir / BUILD_INFO).read_text())

        held_out = {
            d: tokenize_and_pack(DatasetDict(validation=corpus[d]["validation"]), tokenizer, recipe.block_size)[
                "validation"
            ]
            for d in ("code", "prose")
        }
        counts = token_counts(
            tokenize_and_pack(DatasetDict(train=corpus.mixed["train"]), tokenizer, recipe.block_size)["train"],
            len(tokenizer),
        )
        trained = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        untrained = init_model(recipe, tokenizer).eval()
        reports = {
            name: specialisation_report(
                measure_domains(model, held_out, max_blocks=bench.report_blocks, unigram_counts=counts)
            )
            for name, model in (("trained", trained), ("at_init", untrained))
        }

    results = {
        "command": "python benchmarks/expert_specialisation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads_training": info["torch_threads"],
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after_build": [round(x, 2) for x in load_after],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "fresh_cache": bench.cache_dir is None,
        "recipe": dataclasses.asdict(recipe),
        "num_parameters": info["num_parameters"],
        "train_blocks": info["train_blocks"],
        "tokens_seen": info["tokens_seen"],
        "final_train_loss": round(info["final_train_loss"], 4),
        "time": {"total_build_wall_s": total_s, "stages": watch.stages, "train_wall_s": info["train_seconds"]},
        "corpus": {"fingerprint": corpus.fingerprint, "chars": corpus.manifest["chars"]},
        "eval_blocks_per_domain": bench.report_blocks,
        **reports,
    }
    out = Path(bench.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    summary = {
        name: {
            "loss": {d: r["domains"][d]["loss"] for d in r["domains"]},
            "unigram": {d: r["domains"][d]["unigram_loss"] for d in r["domains"]},
            "mean_JSD_bits": r["mean_js_divergence_bits"],
            "JSD_per_layer": [x["js_divergence_bits"] for x in r["layers"]],
        }
        for name, r in reports.items()
    }
    print(json.dumps({"total_build_wall_s": total_s, "stages": watch.stages, **summary}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
