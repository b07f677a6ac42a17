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
  against the expected size: quantized values at their bits, one scale per group/channel, the rest as stored;
- kernel microbenchmarks (one matmul of ``rows`` x [out, in] at the benchmark models' shapes): fp32 F.linear,
  the packed GEMV kernels, the many-row paths of ``packed_kernels.py``, and fbgemm's dynamic int8 linear with
  its error against the dequantized reference (why hf_moeprune does not use it).

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
import warnings
from pathlib import Path

import torch
from inference_benchmark import stdlib_docstring_lines, train_tokenizer
from transformers import AutoModelForCausalLM, MixtralConfig

from hf_moeprune.quantization import QuantizationConfig, quantize, select_targets
from hf_moeprune.quantization.compressed_tensors_export import CompressedTensorsExportConfig, export_compressed_tensors
from hf_moeprune.quantization.packed_kernels import (
    KERNELS,
    PackedWeight,
    int4_kernel_weights,
    int8_kernel_weights,
    packed_kernels,
)
from hf_moeprune.quantization.schemes import get_scheme

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


# -- kernel microbenchmarks --------------------------------------------------------------------------------------
KERNEL_SHAPES = {"expert-heavy gate_up": (4096, 1024), "expert-heavy down": (1024, 2048),
                 "expert-heavy q_proj": (1024, 1024), "demo gate_up": (512, 128), "demo down": (128, 256)}  # fmt: skip
KERNEL_ROWS = (1, 4, 16, 64, 256)


def _best_ms(fn, reps: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return round(best * 1e3, 4)


def _fbgemm_prepack(dense: torch.Tensor):
    """fbgemm's dynamic int8 linear (per-channel int8 weights, activations quantized per tensor at run time).

    torch's quantized engine is public but its tensor type is deprecated (pytorch/pytorch#184982, torch 2.13 warns
    on ``quantize_per_channel``); measured here only, hf_moeprune does not use it (see the kernels section)."""
    absmax = dense.abs().amax(dim=1).clamp_min(1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(dense, (absmax / 127).double(), torch.zeros(len(absmax), dtype=torch.long),
                                       0, torch.qint8)  # fmt: skip
        return torch.ops.quantized.linear_prepack(q, None)


def _fbgemm_linear(x: torch.Tensor, prepacked) -> torch.Tensor:
    # reduce_range=True: 7-bit activations, which fbgemm needs on AVX2 (no VNNI) to avoid int16 saturation
    return torch.ops.quantized.linear_dynamic(x, prepacked, True)


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


def _kernels_of(weight: torch.Tensor) -> dict:
    """name -> fn(x) for one [out, in] weight, every copy prepared once as the runtime does."""
    out_features, in_features = weight.shape
    int8 = get_scheme("int8").quantize(weight, 128)
    codes8, scales8 = int8_kernel_weights(get_scheme("int8").dequantize(int8, weight.shape, torch.float32, 128))
    nibbles, scale4 = get_scheme("int4").quantize(weight, 128)
    packed4, sz4 = int4_kernel_weights(nibbles, scale4, out_features, in_features, 128)

    class _Param:  # just enough of a QuantizedWeight for the int4 many-rows kernel
        scheme, group_size, shape, dtype = "int4", 128, weight.shape, torch.float32

    int4_weight = PackedWeight(_Param(), (nibbles, scale4))
    fns = {
        "fp32 F.linear": lambda x: torch.nn.functional.linear(x, weight),
        "int8pack (bf16)": lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), codes8, scales8).float(),
        "int4pack (bf16)": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed4, 128, sz4
        ).float(),
        "int8_gemm (many rows, int8)": lambda x: torch.nn.functional.linear(x, codes8.float()) * scales8.float(),
        "dequantize (many rows, int4)": lambda x: KERNELS["dequantize"](int4_weight, x),
    }
    if _fbgemm_available():
        prepacked = _fbgemm_prepack(weight)
        fns["fbgemm dynamic int8"] = lambda x: _fbgemm_linear(x, prepacked)
    return fns


def kernel_timings() -> list[dict]:
    rows_out = []
    for name, (out_features, in_features) in KERNEL_SHAPES.items():
        torch.manual_seed(0)
        fns = _kernels_of(torch.randn(out_features, in_features) * 0.02)
        for rows in KERNEL_ROWS:
            x = torch.randn(rows, in_features)
            row = {"shape": name, "out_in": [out_features, in_features], "rows": rows}
            row.update({label: _best_ms(lambda fn=fn: fn(x)) for label, fn in fns.items()})  # noqa: B023 (called here)
            rows_out.append(row)
            print("kernels", row, flush=True)
    return rows_out


def _fbgemm_kernel(cache: dict):
    def kernel(weight, rows):
        if id(weight) not in cache:
            codes, scales = weight.parametrization.kernel_weights(weight.packed, weight.expert, weight.transposed)
            cache[id(weight)] = (weight, _fbgemm_prepack(codes.float() * scales.float()[:, None]))
        return _fbgemm_linear(rows.float(), cache[id(weight)][1])

    return kernel


def fbgemm_error(held_out_small: torch.Tensor) -> list[dict]:
    """Logits error against the dequantized reference with every int8 matmul on (a) hf_moeprune's kernels,
    (b) fbgemm's dynamic int8, on the tiny models the tests use (widths 64/128)."""
    from hf_moeprune.demo.tiny_models import tiny_model

    results = []
    for family, extra in (("mixtral", {"head_dim": 16}), ("qwen3_moe", {"head_dim": 16, "moe_intermediate_size": 128})):
        model = quantize(tiny_model(family, hidden_size=64, intermediate_size=128, **extra), "int8", group_size=128)
        with torch.no_grad(), packed_kernels(False):
            reference = model(held_out_small).logits
        entry = {"family": family}
        for label, patch in (("hf_moeprune kernels", None), ("fbgemm dynamic int8", _fbgemm_kernel({}))):
            saved = dict(KERNELS)
            if patch is not None:
                KERNELS.update({"int8pack": patch, "int8_gemm": patch})
            try:
                with torch.no_grad():
                    out = model(held_out_small).logits
            finally:
                KERNELS.update(saved)
            cosine = torch.nn.functional.cosine_similarity(out.flatten().double(), reference.flatten().double(), 0)
            error = ((out - reference).norm() / reference.norm()).item()
            entry[label] = {"logits_cosine": round(cosine.item(), 6), "relative_error": round(error, 5)}
        results.append(entry)
        print("fbgemm error", entry, flush=True)
    return results


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
    results["kernels"] = kernel_timings()
    if _fbgemm_available():
        small = torch.randint(3, 99, (2, 11), generator=torch.Generator().manual_seed(3))
        results["fbgemm_error"] = fbgemm_error(small)
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
    if results.get("kernels"):
        names = [k for k in results["kernels"][0] if k not in ("shape", "out_in", "rows")]
        head = "| weight [out, in] | rows | " + " | ".join(names) + " |"
        lines += [
            "## Kernels (ms per matmul, best of 3; one thread)",
            "",
            head,
            "|---|---:" + "|---:" * len(names) + "|",
        ]
        for row in results["kernels"]:
            cells = " | ".join(f"{row[n]:.3f}" if n in row else "-" for n in names)
            lines.append(f"| {row['shape']} {row['out_in']} | {row['rows']} | {cells} |")
        lines.append("")
    if results.get("fbgemm_error"):
        lines += ["## Error against the dequantized reference (tiny test models, int8 group 128, 2x11 tokens)", "",
                  "| family | kernels | logits cosine | relative error |", "|---|---|---:|---:|"]  # fmt: skip
        for entry in results["fbgemm_error"]:
            for label in ("hf_moeprune kernels", "fbgemm dynamic int8"):
                row = entry[label]
                lines.append(f"| {entry['family']} | {label} | {row['logits_cosine']} | {row['relative_error']} |")
        lines += ["", "The int8 tests hold hf_moeprune's kernels to cosine > 0.9995 and relative error < 0.04. fbgemm "
                  "quantizes activations per tensor (7 bits); random tiny models have none of the outlier features of "
                  "trained LLMs that make that far worse, so it is measured here and not used.", ""]  # fmt: skip
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
    for row in results.get("kernels", []):
        if row["rows"] == 1 and row["shape"].startswith("expert-heavy"):
            fp32 = row["fp32 F.linear"]
            out.append(f"kernel speed at 1 row, {row['shape']} {row['out_in']}: fp32 {fp32:.3f} ms, int8pack "
                       f"{fp32 / row['int8pack (bf16)']:.2f}x, int4pack {fp32 / row['int4pack (bf16)']:.2f}x"
                       + (f", fbgemm dynamic int8 {fp32 / row['fbgemm dynamic int8']:.2f}x" if "fbgemm dynamic int8"
                          in row else "") + " faster than fp32 (the ceiling of a whole-model speed-up)")  # fmt: skip
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
    results["machine"] = (
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), "
        + (platform.processor() or platform.machine())
        + f", torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
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
