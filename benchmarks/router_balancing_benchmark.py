"""Router load balancing while fine-tuning the demo MoE: no balancing, Switch aux loss, aux-loss-free bias.

The demo Mixtral (pretrained on stdlib code + docstrings; routing is skewed: a few experts take most tokens)
is fine-tuned on prose with MoEPruneTrainer, pruning off, under each balancing setting. Reported per setting:
MaxVio (max expert load / mean - 1, per layer, averaged over layers) at the start and the end of training,
measured on the training batches as the trainer logs it; held-out prose and code loss after training; and
MaxVio of the *saved and reloaded* model on held-out blocks (the learned bias routes after from_pretrained).
Writes router_balancing.{json,md} and a plot of MaxVio over training steps.

    python benchmarks/router_balancing_benchmark.py     # writes benchmarks/results/router_balancing.*
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moeprune  # noqa: F401
from hf_moeprune.balancing.loads import measure_expert_loads
from hf_moeprune.balancing.router import max_violation
from hf_moeprune.demo import build_corpus, load_or_train_base_model
from hf_moeprune.demo.pipeline import domain_blocks, held_out_loss
from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer

RESULTS = Path(__file__).parent / "results"

SETTINGS = {
    "none": {"router_aux_loss_coef": 0.0},
    "aux loss 0.01": {"router_aux_loss_coef": 0.01},
    "bias 1e-3": {"router_aux_loss_coef": 0.0, "router_bias_update_rate": 1e-3},
    "bias 1e-2": {"router_aux_loss_coef": 0.0, "router_bias_update_rate": 1e-2},
}


def held_out_maxvio(model, blocks) -> float:
    ids = torch.tensor(blocks["input_ids"])
    batches = [{"input_ids": ids[i : i + 16]} for i in range(0, len(ids), 16)]
    loads = measure_expert_loads(model, batches, progress=False)
    return sum(max_violation(load) for load in loads.values()) / len(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo base model)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "router_balancing"))
    opts = parser.parse_args()

    model_dir = opts.model or str(load_or_train_base_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prose, held_out = domain_blocks(build_corpus(), tokenizer, opts.eval_blocks)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": model_dir,
        "steps": opts.steps,
        "batch": f"{opts.batch} x 128 tokens",
        "before": {
            "held_out_maxvio": {d: held_out_maxvio(base, held_out[d]) for d in ("prose", "code")},
            "loss": {d: held_out_loss(base, held_out[d]) for d in ("prose", "code")},
        },
        "settings": {},
    }
    curves = {}
    for name, extra in SETTINGS.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with tempfile.TemporaryDirectory() as out:
            args = MoEPruneArguments(
                output_dir=out, max_steps=opts.steps, per_device_train_batch_size=opts.batch, learning_rate=5e-4,
                report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                use_cpu=not torch.cuda.is_available(), prune_target=0.0, prune_report=False, **extra,
            )  # fmt: skip
            trainer = MoEPruneTrainer(model=model, args=args, train_dataset=prose["train"])
            trainer.train()
            curve = [h["moe/maxvio/mean"] for h in trainer.state.log_history if "moe/maxvio/mean" in h]
            trainer.save_model(str(Path(out) / "final"))
            reloaded = AutoModelForCausalLM.from_pretrained(Path(out) / "final").eval()
        curves[name] = curve
        window = max(1, len(curve) // 10)
        result["settings"][name] = {
            "arguments": extra,
            "train_maxvio_first": sum(curve[:window]) / window,
            "train_maxvio_last": sum(curve[-window:]) / window,
            "held_out_maxvio": {d: held_out_maxvio(reloaded, held_out[d]) for d in ("prose", "code")},
            "loss": {d: held_out_loss(reloaded, held_out[d]) for d in ("prose", "code")},
            "curve": curve,
        }
        print(name, {k: v for k, v in result["settings"][name].items() if k != "curve"}, flush=True)

    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(curves, out.with_suffix(".png"))
    before = result["before"]
    lines = [
        "# Router load balancing while fine-tuning the demo MoE",
        "",
        f"Command: `{result['command']}`  ",
        f"Model: demo Mixtral (4 layers x 16 experts, top-2), fine-tuned on prose, {result['batch']}, "
        f"{opts.steps} steps, lr 5e-4, pruning off. MaxVio = max expert load / mean load - 1, mean over layers "
        f"(0 = perfectly even). Train MaxVio: mean of the first / last {window} logged steps. Held-out: "
        f"{opts.eval_blocks} blocks per domain, measured on the saved and reloaded model.",
        "",
        "| setting | train MaxVio first | last | held-out MaxVio prose | code | loss prose | code |",
        "|---|---|---|---|---|---|---|",
        f"| base model (no fine-tuning) | | | {before['held_out_maxvio']['prose']:.2f} | "
        f"{before['held_out_maxvio']['code']:.2f} | {before['loss']['prose']:.4f} | {before['loss']['code']:.4f} |",
    ]
    for name, row in result["settings"].items():
        lines.append(
            f"| {name} | {row['train_maxvio_first']:.2f} | {row['train_maxvio_last']:.2f} | "
            f"{row['held_out_maxvio']['prose']:.2f} | {row['held_out_maxvio']['code']:.2f} | "
            f"{row['loss']['prose']:.4f} | {row['loss']['code']:.4f} |"
        )
    lines += ["", f"![MaxVio over training]({out.with_suffix('.png').name})"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MaxVio (mean over layers)")
    ax.set_title("Router load imbalance while fine-tuning the demo MoE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
