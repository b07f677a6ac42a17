"""Does pruning during fine-tuning beat the alternatives? Same base model, budget and data for every method, 3 seeds.

Domain shift: the base model is the demo Mixtral pretrained on ONE domain only, Python stdlib source with its
docstrings cut out (``BaseModelConfig(pretrain_domain="code")``, cached like the demo model, keyed by its
recipe). The task is to fine-tune it on the stdlib docstrings, English prose it never saw in pretraining (the
code keeps its ``#`` comments, the only English it read). At 25%, 50% and 75% of routed experts removed, compare:
- no pruning (full fine-tune, the reference);
- dynamic pruning during fine-tuning (MoEPruneTrainer), each criterion with uniform allocation, and the
  layer-adaptive LAEP rule (with the REAP criterion);
- post-hoc one-shot pruning of the fine-tuned model: frequency, REAP and EAN, REAP protecting super experts,
  and REAP with merging (removed experts folded into the most similar kept ones), statistics from prose training
  blocks (the usual calibration set);
- random pruning of the fine-tuned model (uniform allocation).
Every method is run once per seed. A seed fixes the fine-tuning data order (Trainer ``seed``), the calibration
blocks (drawn from the prose training split) and the random baseline's scores; the base model is the same for
every seed. Reported: held-out loss on prose (target) and code (what was forgotten), mean and sample standard
deviation over the seeds, and which differences are larger than that spread.

    python benchmarks/pruning_methods_benchmark.py      # writes benchmarks/results/pruning_methods.{json,md,png}
    python benchmarks/pruning_methods_benchmark.py --from-json benchmarks/results/pruning_methods.json  # re-render
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchmarks_common import StepTimer, TrainingMemory
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moeprune
from hf_moeprune.demo import BaseModelConfig, build_corpus, load_or_train_base_model
from hf_moeprune.demo.pipeline import domain_blocks, held_out_loss
from hf_moeprune.oneshot import (
    ExpertOutputObserver,
    MaxActivationObserver,
    collect_statistics,
    plan_oneshot,
    super_experts,
)
from hf_moeprune.pruning.merging import merge_before_removal
from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer
from hf_moeprune.utils import atomic_write_bytes, atomic_write_text

RESULTS = Path(__file__).parent / "results"
DYNAMIC_CRITERIA = ("frequency", "prob_mass", "reap", "saliency")
REFERENCE = "full fine-tune"
# (a, b): comparisons the report states explicitly, besides the best-of-each-family one
KEY_PAIRS = (
    ("dynamic reap", "post-hoc reap"),
    ("dynamic frequency", "post-hoc frequency"),
    ("dynamic reap + LAEP", "dynamic reap"),
    ("post-hoc reap", "post-hoc frequency"),
    ("post-hoc ean", "post-hoc reap"),
    ("post-hoc reap + super experts", "post-hoc reap"),
    ("post-hoc reap + merging", "post-hoc reap"),
    ("post-hoc reap", "random"),
)


def finetune(model_dir, data, steps, batch, seed, **prune):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as out:
        args = MoEPruneArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
            warmup_steps=5, report_to=[], save_strategy="no", logging_steps=10_000, disable_tqdm=True,
            seed=seed, use_cpu=not torch.cuda.is_available(), prune_report=False, **prune,
        )  # fmt: skip
        trainer = MoEPruneTrainer(model=model, args=args, train_dataset=data)
        timer, memory = StepTimer(), TrainingMemory(trainer)
        trainer.add_callback(timer)
        trainer.add_callback(memory)
        trainer.train()
    model = trainer.model.eval()
    return model, {
        "step_s": statistics.median(timer.times[len(timer.times) // 2 :]),
        "train_memory_bytes": memory.per_step[-1]["total"],
    }


def measure(model, held_out, batch) -> dict:
    out = {}
    for domain, blocks in held_out.items():
        out[f"{domain}_loss"] = held_out_loss(model, blocks, batch)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["bytes"] = hf_moeprune.model_size_bytes(model)
    out["experts_per_layer"] = getattr(model.config, "experts_per_layer", None)
    return out


def run_seed(seed, opts, model_dir, prose_train, sparsities, record) -> None:
    """Every method at every sparsity for one seed (the full fine-tune first: post-hoc methods start from it)."""
    start_step, end_step = opts.steps // 10, opts.steps // 2
    full, cost = finetune(model_dir, prose_train, opts.steps, opts.batch, seed, prune_target=0.0)
    record(REFERENCE, 0.0, seed, full, cost)
    # calibration blocks: a seeded draw from the prose training split
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(prose_train), generator=generator)[: opts.calibration_blocks].tolist()
    calibration_ids = torch.tensor(prose_train.select(picked)["input_ids"])
    calibration = [{"input_ids": calibration_ids[i : i + 16]} for i in range(0, len(calibration_ids), 16)]
    observers = [MaxActivationObserver(), ExpertOutputObserver()]
    stats = collect_statistics(full, calibration, progress=False, observers=observers)
    max_activation, output_sum = observers[0].values["max_activation"], observers[1].values["output_sum"]
    tokens = {layer: s.tokens for layer, s in stats.items()}

    for sparsity in sparsities:
        schedule = dict(prune_target=sparsity, prune_schedule="gradual", prune_start_step=start_step,
                        prune_end_step=end_step)  # fmt: skip
        for criterion in DYNAMIC_CRITERIA:
            model, cost = finetune(model_dir, prose_train, opts.steps, opts.batch, seed, prune_criterion=criterion,
                                   prune_layer_adaptive=False, **schedule)  # fmt: skip
            record(f"dynamic {criterion}", sparsity, seed, model, cost)
        model, cost = finetune(model_dir, prose_train, opts.steps, opts.batch, seed, prune_criterion="reap",
                               prune_layer_adaptive=True, prune_allocation="laep", **schedule)  # fmt: skip
        record("dynamic reap + LAEP", sparsity, seed, model, cost)
        for criterion in ("frequency", "reap", "ean"):
            model = copy.deepcopy(full)
            hf_moeprune.prune_experts(model, plan_oneshot(model, stats, criterion, sparsity))
            record(f"post-hoc {criterion}", sparsity, seed, model, {})
        model = copy.deepcopy(full)
        plan = plan_oneshot(model, stats, "reap", sparsity, protect=super_experts(max_activation))
        hf_moeprune.prune_experts(model, plan)
        record("post-hoc reap + super experts", sparsity, seed, model, {})
        model = copy.deepcopy(full)
        plan = plan_oneshot(model, stats, "reap", sparsity)
        merge_before_removal(model, plan, tokens, output_sum)
        hf_moeprune.prune_experts(model, plan)
        record("post-hoc reap + merging", sparsity, seed, model, {})
        generator = torch.Generator().manual_seed(1000 * seed + int(sparsity * 100))
        random_scores = {layer: torch.rand(len(s.tokens), generator=generator) for layer, s in stats.items()}
        model = copy.deepcopy(full)
        hf_moeprune.prune_experts(model, plan_oneshot(model, stats, "frequency", sparsity, scores=random_scores))
        record("random", sparsity, seed, model, {})


# -- summary (pure) ------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (method, sparsity): seeds, mean and sample std of the held-out losses, cost figures."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["sparsity"]), []).append(run)
    rows = []
    for (method, sparsity), group in groups.items():
        row = {"method": method, "sparsity": sparsity, "seeds": [r["seed"] for r in group]}
        for domain in ("prose", "code"):
            values = [r[f"{domain}_loss"] for r in group]
            row[f"{domain}_mean"], row[f"{domain}_std"] = _mean_std(values)
            row[f"{domain}_by_seed"] = {r["seed"]: r[f"{domain}_loss"] for r in group}
        for key in ("step_s", "train_memory_bytes"):
            if all(key in r for r in group):
                row[key] = statistics.median(r[key] for r in group)
        row["parameters"] = group[0]["parameters"]  # the same for every seed: the budget is the method's
        rows.append(row)
    return rows


def compare(a: dict, b: dict, domain: str = "prose") -> dict:
    """b's mean loss minus a's, the spread it is held against (std of a + std of b: the mean +- std ranges do not
    overlap when the gap exceeds it), and on how many shared seeds a was lower than b."""
    gap = b[f"{domain}_mean"] - a[f"{domain}_mean"]
    spread = (a[f"{domain}_std"] or 0.0) + (b[f"{domain}_std"] or 0.0)
    shared = sorted(set(a[f"{domain}_by_seed"]) & set(b[f"{domain}_by_seed"]))
    a_lower = sum(a[f"{domain}_by_seed"][s] < b[f"{domain}_by_seed"][s] for s in shared)
    both_seeded = a[f"{domain}_std"] is not None and b[f"{domain}_std"] is not None
    return {"gap": gap, "spread": spread, "a_lower": a_lower, "seeds": len(shared),
            "beyond_spread": both_seeded and abs(gap) > spread}  # fmt: skip


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f} (1 run)"


def report(result: dict) -> str:
    summary = summarize(result["runs"])
    ref = next(r for r in summary if r["method"] == REFERENCE)
    by_key = {(r["method"], r["sparsity"]): r for r in summary}
    sparsities = sorted({r["sparsity"] for r in summary if r["sparsity"] > 0})
    lines = [
        f"# Pruning during fine-tuning vs the alternatives (domain shift, {len(result['seeds'])} seeds)",
        "",
        f"Command: `{result['command']}` ({result['seconds']} s, {result['device']}, on a shared 2-core machine "
        "that other jobs were using: timings are indicative only)  ",
        *(
            [f"Report re-rendered from its JSON with `{result['rendered_with']}`.  "]
            if "rendered_with" in result
            else []
        ),  # fmt: skip
        f"Base: {result['base']['description']} (`{result['model']}`): pretrained {result['base']['max_steps']} "
        f"steps on `{result['base']['pretrain_domain']}` only (its build report, 128 held-out blocks per domain: "
        f"code loss {result['base']['held_out_code_loss']:.4f}, prose {result['base']['held_out_prose_loss']:.4f}).  ",
        f"Fine-tune: stdlib docstrings (prose) for {result['steps']} steps of {result['batch']}, lr 1e-3; dynamic "
        f"schedules gradual from step {result['steps'] // 10} to {result['steps'] // 2}. Seeds: "
        f"{result['seeds']} (data order, calibration draw of {result['calibration_blocks']} blocks, random baseline). "
        f"Held-out: {result['eval_blocks']} blocks of 128 tokens per domain.",
        "",
        "Losses are mean ± sample std over the seeds. `vs full FT`: relative change of the mean prose loss against "
        "the unpruned fine-tune.",
        "",
        "| method | removed | seeds | prose loss | vs full FT | code loss | step ms | train MiB | params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        rel = (r["prose_mean"] / ref["prose_mean"] - 1) * 100
        step = f"{r['step_s'] * 1000:.0f}" if "step_s" in r else "-"
        mem = f"{r['train_memory_bytes'] / 2**20:.1f}" if "train_memory_bytes" in r else "-"
        lines.append(
            f"| {r['method']} | {r['sparsity']:.0%} | {len(r['seeds'])} | {_fmt(r['prose_mean'], r['prose_std'])} | "
            f"{rel:+.2f}% | {_fmt(r['code_mean'], r['code_std'])} | {step} | {mem} | {r['parameters']:,} |"
        )

    lines += [
        "",
        "## Which differences exceed the seed spread",
        "",
        "Rule: a difference of mean prose loss counts as larger than the seed spread when it exceeds the sum of "
        "the two standard deviations (the mean ± std ranges do not overlap); `seeds it was lower` counts the seeds "
        "on which the method with the lower mean had the lower loss (the runs of a seed share the data order and, for "
        "post-hoc methods, the fine-tuned model). The first row of each sparsity compares the best dynamic method "
        "with the best other one.",
        "",
        "| removed | compared | lower mean loss | difference of means | spread (std + std) | seeds it was lower | "
        "beyond spread |",
        "|---|---|---|---|---|---|---|",
    ]
    for sparsity in sparsities:
        here = [r for r in summary if r["sparsity"] == sparsity]
        dynamic = [r for r in here if r["method"].startswith("dynamic")]
        post_hoc = [r for r in here if not r["method"].startswith("dynamic")]
        pairs = []
        if dynamic and post_hoc:
            pairs.append((min(dynamic, key=lambda r: r["prose_mean"]), min(post_hoc, key=lambda r: r["prose_mean"])))
        pairs += [(by_key[a, sparsity], by_key[b, sparsity]) for a, b in KEY_PAIRS
                  if (a, sparsity) in by_key and (b, sparsity) in by_key]  # fmt: skip
        for a, b in pairs:
            c = compare(a, b)
            winner, lower = (a, c["a_lower"]) if c["gap"] >= 0 else (b, c["seeds"] - c["a_lower"])
            name = winner["method"] if c["gap"] else "tie (same losses)"
            lines.append(
                f"| {sparsity:.0%} | {a['method']} vs {b['method']} | {name} | {abs(c['gap']):.4f} | "
                f"{c['spread']:.4f} | {lower}/{c['seeds']} | {'yes' if c['beyond_spread'] else 'no'} |"
            )
    lines += ["", "Every method, ranked by mean prose loss, and the methods it beats by more than the seed spread:", ""]
    for sparsity in sparsities:
        here = sorted((r for r in summary if r["sparsity"] == sparsity), key=lambda r: r["prose_mean"])
        lines.append(f"- **{sparsity:.0%} removed**")
        for r in here:
            beaten = [
                o["method"] for o in here if o is not r and compare(r, o)["beyond_spread"] and compare(r, o)["gap"] > 0
            ]
            lines.append(f"  - {r['method']} ({_fmt(r['prose_mean'], r['prose_std'])}): "
                         f"{', '.join(beaten) if beaten else 'beats none beyond the spread'}")  # fmt: skip
    analysis = result.get("analysis")
    if analysis:
        lines += ["", "## Analysis", "", analysis]
    lines += ["", f"![held-out loss, mean ± std over seeds]({Path(result['out']).with_suffix('.png').name})"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(result["runs"])
    ref = next(r for r in summary if r["method"] == REFERENCE)
    base = next((r for r in summary if r["sparsity"] == 0 and r["method"] != REFERENCE), None)
    methods = list(dict.fromkeys(r["method"] for r in summary if r["sparsity"] > 0))
    fig, axes = plt.subplots(1, 3, figsize=(19, 5))
    panels = (("prose", "target"), ("prose", "target, zoomed"), ("code", "forgetting"))
    markers = itertools.cycle("osD^v<>p*hX")
    for index, method in enumerate(methods):
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["sparsity"])
        marker, color = next(markers), plt.cm.tab20(index % 20)
        for ax, (domain, _) in zip(axes, panels):
            # a small sideways offset per method keeps the error bars apart
            offset = 0.006 * (index - (len(methods) - 1) / 2)
            ax.errorbar([r["sparsity"] + offset for r in rows], [r[f"{domain}_mean"] for r in rows],
                        yerr=[r[f"{domain}_std"] or 0.0 for r in rows], marker=marker, capsize=3, label=method,
                        color=color, linestyle="-" if method.startswith("dynamic") else "--")  # fmt: skip
    for ax, (domain, what) in zip(axes, panels):
        ax.axhline(ref[f"{domain}_mean"], color="black", linestyle=":", label="full fine-tune (0%)")
        if base is not None:
            ax.axhline(base[f"{domain}_mean"], color="grey", linestyle="-.", label=base["method"])
        ax.set_xlabel("fraction of routed experts removed")
        ax.set_ylabel(f"held-out {domain} loss ({what})")
        ax.set_xticks(sorted({r["sparsity"] for r in summary if r["sparsity"] > 0}))
    axes[0].set_ylim(top=min(axes[0].get_ylim()[1], ref["prose_mean"] * 1.25))
    axes[0].set_title(f"prose after {result['base']['pretrain_domain']}-only pretraining (mean ± std)")
    # the zoom shows the band where the dynamic and post-hoc methods differ (random and merging leave it)
    axes[1].set_ylim(ref["prose_mean"] - 0.02, ref["prose_mean"] + 0.2)
    axes[1].set_title("prose, zoomed")
    axes[2].set_title(f"code (pretrained on {result['base']['pretrain_domain']})")
    axes[2].legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def write(result: dict) -> None:
    out = Path(result["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1))
    atomic_write_text(out.with_suffix(".md"), report(result))
    if any(r["sparsity"] > 0 for r in result["runs"]):
        plot(result, out.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every method runs once per seed")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per run")
    parser.add_argument("--batch", type=int, default=8, help="blocks of 128 tokens per step")
    parser.add_argument("--sparsities", default="0.25,0.5,0.75")
    parser.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks per domain")
    parser.add_argument("--calibration-blocks", type=int, default=64, help="prose blocks drawn per seed")
    parser.add_argument("--pretrain-domain", default="code", help="code, prose or mixed (the old benchmark)")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="base model pretraining steps")
    parser.add_argument("--analysis", default=None, help="a text file whose paragraph goes into the report")
    parser.add_argument("--from-json", default=None, help="re-render the report of a finished (or partial) run")
    parser.add_argument("--out", default=str(RESULTS / "pruning_methods"))
    opts = parser.parse_args()
    analysis = Path(opts.analysis).read_text().strip() if opts.analysis else None
    if opts.from_json:
        result = json.loads(Path(opts.from_json).read_text())
        result["out"] = opts.out
        result["rendered_with"] = "python " + " ".join(sys.argv)
        if analysis:
            result["analysis"] = analysis
        write(result)
        print(report(result))
        return
    seeds = [int(s) for s in opts.seeds.split(",")]
    sparsities = [float(s) for s in opts.sparsities.split(",")]

    recipe = BaseModelConfig(pretrain_domain=opts.pretrain_domain, max_steps=opts.pretrain_steps, num_threads=1)
    model_dir = load_or_train_base_model(recipe)
    build_info = json.loads((model_dir / "build_info.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prose, held_out = domain_blocks(build_corpus(), tokenizer, opts.eval_blocks)
    started = time.perf_counter()
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": str(model_dir),
        "base": {
            "description": "demo Mixtral (4 layers, 16 experts, top-2, 7.0M parameters)",
            "pretrain_domain": opts.pretrain_domain,
            "max_steps": opts.pretrain_steps,
            "held_out_code_loss": build_info["held_out"]["domains"]["code"]["loss"],
            "held_out_prose_loss": build_info["held_out"]["domains"]["prose"]["loss"],
            "train_seconds": build_info["train_seconds"],
        },
        "steps": opts.steps,
        "batch": f"{opts.batch} x 128 tokens",
        "seeds": seeds,
        "sparsities": sparsities,
        "eval_blocks": opts.eval_blocks,
        "calibration_blocks": opts.calibration_blocks,
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "out": opts.out,
        "analysis": analysis,
        "runs": [],
    }

    def record(method, sparsity, seed, model, extra):
        row = {"method": method, "sparsity": sparsity, "seed": seed, **measure(model, held_out, 16), **extra}
        result["runs"].append(row)
        result["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[{result['seconds']:7.1f}s] seed {seed} {method:<30} {sparsity:.2f} prose {row['prose_loss']:.4f} "
              f"code {row['code_loss']:.4f}", flush=True)  # fmt: skip

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    record("base (no fine-tune)", 0.0, None, base, {})
    for seed in seeds:
        run_seed(seed, opts, model_dir, prose["train"], sparsities, record)
        write(result)  # a partial result survives an interrupted run
    result["seconds"] = round(time.perf_counter() - started, 1)
    write(result)
    print(report(result))


if __name__ == "__main__":
    main()
