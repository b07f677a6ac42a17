"""Throughput and peak memory of ``hf-moeprune generate`` at several batch sizes, engines and models.

Rows: every (model, engine, batch size) for the unpruned fp32 model, a non-uniformly pruned model and
the pruned + int8-quantized model, all on the same prompts. Each row runs in its own process (so peak
RSS is that row's alone) and calls ``generate_main`` exactly as the CLI does: "end-to-end seconds" is
model load + tokenization + generation + writing the JSONL; "generation tokens/s" is generated tokens
over the generation phase only. Greedy outputs are also compared across batch sizes and engines (they
must be token-identical).

    python benchmarks/inference_benchmark.py                     # tiny local Mixtral + stdlib tokenizer
    python benchmarks/inference_benchmark.py --model DIR [--pruned-model DIR] [--quantized-model DIR]

Without ``--model`` the base model is a randomly initialised Mixtral built here (hidden 128, 4 layers,
8 experts, top-2) with a byte-level BPE tokenizer trained on Python standard-library docstrings; its
completions are noise, which is fine for speed. Without ``--pruned-model`` the base is pruned here to
[6, 3, 5, 4] experts per layer; without ``--quantized-model`` that pruned model is quantized to int8 with
``hf_moeprune.quantization`` (skipped, with a note, if that module is not importable).

Results: ``benchmarks/results/inference.json`` and ``inference.md``. CPU timings on a shared machine
vary with its load: the load average before and after is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("inference_benchmark")

TARGET_E2E_SPEEDUP = 2.0  # batch 16 vs batch 1, end to end
TARGET_TOKENS_SPEEDUP = 8.0  # batch 16 vs batch 1, generation tokens/s
DOC_MODULES = ("os", "shutil", "subprocess", "logging", "json", "collections", "itertools", "functools", "pathlib")


def stdlib_docstring_lines(modules=DOC_MODULES) -> list[str]:
    lines = []
    for name in modules:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            doc = inspect.getdoc(obj)
            if doc:
                lines.extend(line.strip() for line in doc.splitlines() if line.strip())
    return lines


def train_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(stdlib_docstring_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_models(args, work: Path) -> tuple[dict[str, str], list[str]]:
    """Model folders by row name, and notes about what was built or skipped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    import hf_moeprune

    notes: list[str] = []
    models: dict[str, str] = {}
    if args.model:
        models["unpruned fp32"] = args.model
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        tokenizer = train_tokenizer()
        config = MixtralConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        path = work / "base"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        models["unpruned fp32"] = str(path)
        notes.append(
            "unpruned fp32: random-init Mixtral built here (hidden 128, intermediate 256, 4 layers, 8 experts, "
            f"top-2, vocab {len(tokenizer)}), BPE tokenizer trained on stdlib docstrings"
        )
    if args.pruned_model:
        models["pruned"] = args.pruned_model
    else:
        model = AutoModelForCausalLM.from_pretrained(models["unpruned fp32"])
        adapter = hf_moeprune.get_adapter(model)
        layers = adapter.moe_layer_indices(model)
        total = adapter.num_experts(adapter.decoder_layers(model)[layers[0]])
        counts = [max(adapter.top_k(model.config), round(total * f)) for f in (0.75, 0.375, 0.625, 0.5)]
        keep = {layer: list(range(counts[i % len(counts)])) for i, layer in enumerate(layers)}
        hf_moeprune.prune_experts(model, keep)
        path = work / "pruned"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        models["pruned"] = str(path)
        notes.append(f"pruned: built here from the base, experts per layer {model.config.experts_per_layer}")
    if args.quantized_model:
        models["pruned + int8"] = args.quantized_model
    else:
        try:
            from hf_moeprune.quantization import quantize
        except ImportError as exc:
            notes.append(f"pruned + quantized: SKIPPED, hf_moeprune.quantization is not importable ({exc})")
        else:
            model = AutoModelForCausalLM.from_pretrained(models["pruned"])
            quantize(model, "int8")
            path = work / "pruned-int8"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            models["pruned + int8"] = str(path)
            notes.append("pruned + int8: the pruned model quantized here with hf_moeprune.quantization (int8)")
    return models, notes


def write_prompts(path: Path, tokenizer_dir: str, n: int, max_prompt_tokens: int) -> dict:
    """``n`` prompts of varied length from docstrings of modules the tokenizer was not trained on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = stdlib_docstring_lines(("argparse", "textwrap", "string", "re", "dataclasses", "inspect"))
    chosen, lengths, step = [], [], max(1, len(lines) // (4 * n))
    for i in range(len(lines) // step):
        if len(chosen) == n:
            break
        # join 1-5 neighbouring lines so that lengths spread from a few tokens to max_prompt_tokens
        text = " ".join(lines[i * step : i * step + 1 + i % 5])
        ids = tokenizer(text).input_ids[:max_prompt_tokens]
        if len(ids) >= 3:
            chosen.append(tokenizer.decode(ids))
            lengths.append(len(ids))
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} prompts could be built, {n} asked")
    with path.open("w") as f:
        for i, text in enumerate(chosen):
            f.write(json.dumps({"id": i, "prompt": text}) + "\n")
    return {"count": n, "min_tokens": min(lengths), "max_tokens": max(lengths), "mean_tokens": sum(lengths) / n}


def worker(args) -> None:
    """One row: run the CLI in this process and print a JSON line with its numbers."""
    import torch

    torch.set_num_threads(args.threads)
    import hf_moeprune  # noqa: F401
    from hf_moeprune.commands.generate import main as generate_main

    stats_path = Path(args.out).with_suffix(".stats.json")
    argv = [args.worker_model, "--prompts", args.prompts, "--out", args.out, "--stats-json", str(stats_path)]
    argv += ["--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens)]
    argv += ["--engine", args.engine, "--experts-implementation", args.experts_implementation, "--progress", "false"]
    import psutil

    baseline = psutil.Process().memory_info().rss  # interpreter + torch + transformers, before the model loads
    start = time.perf_counter()
    generate_main(argv)
    end_to_end = time.perf_counter() - start
    stats = json.loads(stats_path.read_text())
    stats["peak_above_baseline_bytes"] = stats["peak_memory_bytes"] - baseline
    print("RESULT " + json.dumps({"end_to_end_s": end_to_end, **stats}), flush=True)


def run_row(args, model_dir: str, prompts: Path, out: Path, engine: str, batch_size: int, experts: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--worker-model", model_dir, "--prompts", str(prompts)]
    cmd += ["--out", str(out), "--batch-size", str(batch_size), "--engine", engine, "--threads", str(args.threads)]
    cmd += ["--max-new-tokens", str(args.max_new_tokens), "--experts-implementation", experts]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"row failed ({shlex.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def completions(path: Path) -> list[str]:
    return [json.loads(line)["completion"] for line in path.read_text().splitlines()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="unpruned model folder (default: build a tiny Mixtral here)")
    parser.add_argument("--pruned-model", help="pruned model folder (default: prune --model here)")
    parser.add_argument("--quantized-model", help="pruned + quantized model folder (default: int8 of the pruned)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-prompt-tokens", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--engines", nargs="+", default=["padded", "continuous"])
    parser.add_argument(
        "--experts-check",
        nargs="*",
        default=["eager", "grouped_mm"],
        help="also time these experts implementations on the pruned model (padded, batch 16)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row (1: stable on a shared box)")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--experts-implementation", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as tmp:
        work = Path(tmp)
        models, notes = build_models(args, work)
        prompts = work / "prompts.jsonl"
        prompt_info = write_prompts(prompts, models["unpruned fp32"], args.num_prompts, args.max_prompt_tokens)
        rows = []
        plan = [(m, e, b, "auto") for m in models for e in args.engines for b in args.batch_sizes]
        plan += [("pruned", "padded", 16, impl) for impl in args.experts_check if "pruned" in models]
        for model_name, engine, batch_size, experts in plan:
            out = work / f"out-{len(rows)}.jsonl"
            logger.info("row %d/%d: %s, %s, batch %d, experts %s", len(rows) + 1, len(plan), model_name, engine,
                        batch_size, experts)  # fmt: skip
            result = run_row(args, models[model_name], prompts, out, engine, batch_size, experts)
            result.update(model=model_name, requested_experts=experts, completions=completions(out))
            logger.info(
                "  %.2f s end to end, %.1f generated tokens/s, peak %.0f MiB",
                result["end_to_end_s"],
                result["tokens_per_s"],
                result["peak_memory_bytes"] / 2**20,
            )
            rows.append(result)
    load_after = os.getloadavg()

    checks = []
    for model_name in models:
        reference = next(r for r in rows if r["model"] == model_name)["completions"]
        for r in rows:
            if r["model"] == model_name:
                r["same_completions_as_first_row"] = r["completions"] == reference
        # the experts kernel changes float summation order, so only same-kernel rows must agree token for token
        same = all(
            r["same_completions_as_first_row"]
            for r in rows
            if r["model"] == model_name and r["requested_experts"] == "auto"
        )
        checks.append(
            {"check": f"{model_name}: greedy completions identical across batch sizes and engines", "ok": same}
        )
        for engine in args.engines:
            by_bs = {
                r["batch_size"]: r
                for r in rows
                if r["model"] == model_name and r["engine"] == engine and r["requested_experts"] == "auto"
            }
            if 1 in by_bs and 16 in by_bs:
                e2e = by_bs[1]["end_to_end_s"] / by_bs[16]["end_to_end_s"]
                tok = by_bs[16]["tokens_per_s"] / by_bs[1]["tokens_per_s"]
                checks.append(
                    {
                        "check": f"{model_name}, {engine}: batch 16 vs 1 end to end >= {TARGET_E2E_SPEEDUP}x",
                        "value": round(e2e, 2),
                        "ok": e2e >= TARGET_E2E_SPEEDUP,
                    }
                )
                checks.append(
                    {
                        "check": f"{model_name}, {engine}: batch 16 vs 1 tokens/s >= {TARGET_TOKENS_SPEEDUP}x",
                        "value": round(tok, 2),
                        "ok": tok >= TARGET_TOKENS_SPEEDUP,
                    }
                )
    for row in rows:
        del row["completions"]
    import torch
    import transformers

    results = {
        "command": "python benchmarks/inference_benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads_per_row": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "wall_minutes": round((time.time() - started) / 60, 1),
        },
        "prompts": prompt_info,
        "max_new_tokens": args.max_new_tokens,
        "notes": notes,
        "rows": rows,
        "checks": checks,
    }
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "inference.json").write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / "inference.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    m = results["machine"]
    out = [
        "# Batched inference benchmark",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} with {m['torch_threads_per_row']} "
        f"thread(s) per row, transformers {m['transformers']}. Load average before "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_before'])}, after "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_after'])} (a shared machine: timings vary with load).",
        "",
        f"Prompts: {results['prompts']['count']}, {results['prompts']['min_tokens']}-"
        f"{results['prompts']['max_tokens']} tokens (mean {results['prompts']['mean_tokens']:.1f}); "
        f"max new tokens {results['max_new_tokens']}; greedy.",
        "",
        *[f"- {note}" for note in results["notes"]],
        "",
        "End to end = model load + tokenization + generation + writing the JSONL, in one `generate_main` call. "
        "Tokens/s and prompts/s are over the generation phase. Peak memory is the sampled peak RSS of the row's "
        "process during generation (model included); the next column subtracts the RSS measured just before the "
        "model loads (interpreter, torch and transformers), leaving model + KV cache + activations.",
        "",
        "| model | engine | experts | batch | end to end s | generation s | prompts/s | generated tokens/s "
        "| peak RSS MiB | peak above pre-load RSS MiB | same tokens as first row |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        out.append(
            f"| {r['model']} | {r['engine']} | {r['experts_implementation']} | {r['batch_size']} "
            f"| {r['end_to_end_s']:.2f} | {r['seconds']:.2f} | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['peak_memory_bytes'] / 2**20:.0f} | {r['peak_above_baseline_bytes'] / 2**20:.1f} "
            f"| {'yes' if r['same_completions_as_first_row'] else 'no'} |"
        )
    out += ["", "| check | value | ok |", "|---|---:|---|"]
    for c in results["checks"]:
        out.append(f"| {c['check']} | {c.get('value', '')} | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
