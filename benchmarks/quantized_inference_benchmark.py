"""Quantized inference: tokens/s, quality and bytes on disk of fp32, bf16, int8 and int4 MoE models on CPU.

Two Mixtral models are built here (randomly initialised: no download): a demo-sized one (hidden 128, 4 layers,
16 experts, top-2, expert width 256, like ``hf-moeprune demo``'s base model) and an expert-heavy one (hidden 1024,
2 layers, 8 experts, width 2048: ~97% of the weights in experts). Per scheme:

- tokens/s of greedy ``generate`` (16-token prompt, 8 new tokens, min = max) at batch 1, 16 and 64;
  int8/int4 use hf_moeprune's packed kernels (``packed_kernels.py``); "int8 (dequantize)" is the path those
  replace (every weight dequantized on every forward), for comparison;
- logits cosine against fp32 and held-out cross-entropy on Python standard-library docstrings (for randomly
  initialised models the loss sits near log(vocab): only its change across schemes means something; pass
  ``--model DIR`` to measure a trained model);
- bytes of the saved weight files, hf_moeprune format and compressed-tensors (W8A16 per channel, W4A16),
  against the expected size: quantized values at their bits, one scale per group/channel, the rest as stored.

    python benchmarks/quantized_inference_benchmark.py [--model DIR] [--threads N] [--quick]

Results: ``benchmarks/results/quantized_inference.{json,md}``. Timings come from a shared 2-core machine
whose load changes during the run; the load average is recorded next to them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from inference_benchmark import stdlib_docstring_lines, train_tokenizer
from transformers import AutoModelForCausalLM, MixtralConfig

from hf_moeprune.quantization import QuantizationConfig, quantize, select_targets
from hf_moeprune.quantization.compressed_tensors_export import CompressedTensorsExportConfig, export_compressed_tensors
from hf_moeprune.quantization.packed_kernels import packed_kernels

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 16, 64)
SCHEMES = ("fp32", "bf16", "int8", "int4", "int8 (dequantize)")
GOAL_BATCH1 = 2.0  # int8/int4 tokens/s over fp32 at batch 1
SHAPES = {
    "demo": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, num_local_experts=16, num_experts_per_tok=2),
    "expert-heavy": dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=2048, num_local_experts=8, num_experts_per_tok=2),
}  # fmt: skip


def build(name: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False, **SHAPES[name])
    return AutoModelForCausalLM.from_config(config).eval()


def variant(base_dir: Path, scheme: str):
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if scheme == "bf16":
        return model.to(torch.bfloat16)
    if scheme.startswith("int"):
        quantize(model, scheme.split()[0], group_size=128)
    return model


@torch.no_grad()
def tokens_per_second(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, dequantize: bool) -> float:
    ids = torch.randint(4, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    best = math.inf
    with packed_kernels(not dequantize):
        model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up (kernel repacking)
        for _ in range(2):
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


@torch.no_grad()
def quality(model, reference_logits, held_out, dequantize: bool) -> dict:
    with packed_kernels(not dequantize):
        out = model(held_out, labels=held_out)
    logits = out.logits.float()
    cosine = torch.nn.functional.cosine_similarity(logits.flatten().double(), reference_logits.flatten().double(), 0)
    return {"logits_cosine_vs_fp32": round(cosine.item(), 6), "held_out_loss": round(out.loss.item(), 5)}


def expected_bytes(model, fmt: str, bits: int, group_size: int | None) -> int:
    """Quantized weights at ``bits`` + one fp32 scale per group (hf_moeprune) or per group/row (compressed-
    tensors, scales in the weight dtype = fp32 here) + everything else at 4 bytes; headers not counted."""
    targets = {t.full_name for t in select_targets(model, QuantizationConfig(scheme="int8"))}
    total = 0
    for name, p in model.named_parameters():
        if name not in targets:
            total += p.numel() * 4
            continue
        total += math.ceil(p.numel() * bits / 8)
        if fmt == "hf_moeprune":
            total += math.ceil(p.numel() / group_size) * 4
        else:
            rows = p.numel() // p.shape[-1]
            total += rows * (p.shape[-1] // group_size if group_size else 1) * 4 + 8 * 2 * (
                p.numel() // (p.shape[-1] * p.shape[-2])
            )
    return total


def disk_rows(base_dir: Path, work: Path) -> list[dict]:
    rows = []
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for fmt, scheme, bits in (("hf_moeprune", "int8", 8), ("hf_moeprune", "int4", 4),
                              ("compressed-tensors", "int8", 8), ("compressed-tensors", "int4", 4)):  # fmt: skip
        out = work / f"{fmt}-{scheme}"
        out.mkdir(parents=True)
        if fmt == "hf_moeprune":
            variant(base_dir, scheme).save_pretrained(out)
            group = 128
        else:
            group = export_compressed_tensors(
                AutoModelForCausalLM.from_pretrained(base_dir), out, CompressedTensorsExportConfig(scheme)
            ).group_size
        on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        # compressed-tensors: per-expert tensors, so the "rows" of a quantized weight are its output channels
        expected = expected_bytes(base, fmt, bits, group)
        rows.append({"format": fmt, "scheme": scheme, "bytes_on_disk": on_disk, "expected_bytes": expected,
                     "ratio": round(on_disk / expected, 4)})  # fmt: skip
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    tokenizer = train_tokenizer(1024)
    text = " ".join(stdlib_docstring_lines(("inspect", "textwrap", "argparse")))
    held_out = torch.tensor(tokenizer(text)["input_ids"][: 4 * 128]).reshape(4, 128)
    results = {"models": {}}
    batches = (1, 16) if args.quick else BATCHES
    with tempfile.TemporaryDirectory(prefix="qbench-") as tmp:
        work = Path(tmp)
        models = {"given": Path(args.model)} if args.model else {}
        for name in SHAPES if not args.model else ():
            folder = work / name
            build(name, len(tokenizer)).save_pretrained(folder)
            models[name] = folder
        for name, folder in models.items():
            fp32 = variant(folder, "fp32")
            with torch.no_grad():
                reference = fp32(held_out).logits.float()
            entry = {"parameters": sum(p.numel() for p in fp32.parameters()), "schemes": {}}
            for scheme in SCHEMES:
                model = fp32 if scheme == "fp32" else variant(folder, scheme)
                dequantize = scheme.endswith("(dequantize)")
                row = quality(model, reference, held_out, dequantize)
                for batch in batches:
                    row[f"tokens_per_s_batch{batch}"] = round(
                        tokens_per_second(model, batch, 16, args.new_tokens, len(tokenizer), dequantize), 2
                    )
                    print(name, scheme, batch, row[f"tokens_per_s_batch{batch}"], flush=True)
                entry["schemes"][scheme] = row
            entry["disk"] = disk_rows(folder, work / f"disk-{name}")
            results["models"][name] = entry
    return results


def markdown(results: dict) -> str:
    lines = [
        "# Quantized inference on CPU",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Load average before/after: {results['load_before']} / {results['load_after']} (shared machine: timings "
        "vary with the other processes' load)",
        "",
    ]
    for name, entry in results["models"].items():
        schemes = entry["schemes"]
        batches = [k.removeprefix("tokens_per_s_batch") for k in schemes["fp32"] if k.startswith("tokens_per_s")]
        lines += [f"## {name} ({entry['parameters']:,} parameters)", ""]
        head = "| scheme | " + " | ".join(f"tokens/s b{b} (x fp32)" for b in batches)
        lines += [head + " | logits cosine vs fp32 | held-out loss |", "|---" * (len(batches) + 3) + "|"]
        for scheme, row in schemes.items():
            cells = []
            for b in batches:
                value, base = row[f"tokens_per_s_batch{b}"], schemes["fp32"][f"tokens_per_s_batch{b}"]
                cells.append(f"{value:,.1f} ({value / base:.2f}x)")
            lines.append(f"| {scheme} | " + " | ".join(cells) + f" | {row['logits_cosine_vs_fp32']} | "
                         f"{row['held_out_loss']} |")  # fmt: skip
        lines += ["", "| format | scheme | bytes on disk | expected (bits + scales + rest) | ratio |",
                  "|---|---|---:|---:|---:|"]  # fmt: skip
        for row in entry["disk"]:
            lines.append(f"| {row['format']} | {row['scheme']} | {row['bytes_on_disk']:,} | "
                         f"{row['expected_bytes']:,} | {row['ratio']} |")  # fmt: skip
        lines.append("")
    lines += ["## Goals", ""] + [f"- {g}" for g in results["goals"]]
    return "\n".join(lines) + "\n"


def goals(results: dict) -> list[str]:
    out = []
    for name, entry in results["models"].items():
        s = entry["schemes"]
        last = max(int(k.removeprefix("tokens_per_s_batch")) for k in s["fp32"] if k.startswith("tokens_per_s"))
        for scheme in ("int8", "int4"):
            b1 = s[scheme]["tokens_per_s_batch1"] / s["fp32"]["tokens_per_s_batch1"]
            bl = s[scheme][f"tokens_per_s_batch{last}"] / s["fp32"][f"tokens_per_s_batch{last}"]
            out.append(f"{name} {scheme}: batch 1 {b1:.2f}x fp32 (goal >= {GOAL_BATCH1}x: "
                       f"{'met' if b1 >= GOAL_BATCH1 else 'MISSED'}); batch {last} {bl:.2f}x "
                       f"(goal >= 1x: {'met' if bl >= 1 else 'MISSED'})")  # fmt: skip
        for row in entry["disk"]:
            ok = abs(row["ratio"] - 1) <= 0.05
            out.append(f"{name} {row['format']} {row['scheme']}: on disk / expected = {row['ratio']} "
                       f"(goal within 5%: {'met' if ok else 'MISSED'})")  # fmt: skip
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a trained Mixtral-style model folder (default: build two random ones)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 16 only")
    args = parser.parse_args(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = run(args)
    results["command"] = "python benchmarks/quantized_inference_benchmark.py " + shlex.join(argv or sys.argv[1:])
    results["machine"] = f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), " + (
        platform.processor() or platform.machine()
    )
    results["load_before"], results["load_after"] = load_before, [round(x, 2) for x in os.getloadavg()]
    results["goals"] = goals(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantized_inference.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "quantized_inference.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
