"""Full fine-tuning vs LoRA vs QLoRA, each on the whole model and with 50% of the routed experts removed.

python benchmarks/lora_benchmark.py [--steps 8]
python benchmarks/lora_benchmark.py --demo [--steps 40 --batch 8]


Model: a random-init expert-heavy Mixtral (4 layers x 64 experts, top-2, hidden 256; ~95% of its parameters in
experts), random token batches (8 x 64 tokens). "50% removed" keeps 32 experts per layer (chosen at random) before
training, i.e. the model the trainer continues with after a removal. Every run is MoEPruneTrainer (prune_target 0,
frequency statistics, so the same instrumentation in all rows) with AdamW, fp32, CPU. Measured per run: trainable
parameters, training memory of the last step (parameters + gradients + optimizer state + saved activations, from
benchmarks_common.TrainingMemory), the model's stored bytes (packed codes + scales for QLoRA) and the median step
time of the steps after the first two. QLoRA rows: experts and attention packed in nf4 by hf_moeprune.quantize
(after the removal), LoRA r=16 on the attention projections (peft cannot target packed expert tensors).
Writes benchmarks/results/lora.{json,md}. Timings come from a shared, busy 2-core machine: compare rows of one run.

--demo: held-out loss of LoRA + pruning vs LoRA alone on the demo's prose task. Base: the demo Mixtral (16 experts,
pretrained on stdlib code + docstrings, built and cached by hf_moeprune.demo). Both runs fine-tune on prose blocks
of 128 tokens with LoRA r=16 on attention + the fused experts (peft target_parameters) for the same steps, batch,
learning rate and data order; the second also removes 50% of the routed experts with MoEPruneTrainer (REAP,
uniform allocation, gradual schedule from 10% to 50% of the steps). Reported: held-out prose (target) and code
(forgetting) loss of the base and of both runs, trainable parameters, training memory, median step time.
Writes benchmarks/results/lora_demo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from benchmarks_common import StepTimer, TrainingMemory  # noqa: E402

import hf_moeprune  # noqa: E402
from hf_moeprune.demo.tiny_models import tiny_model  # noqa: E402
from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VOCAB, SEQ, BATCH = 512, 64, 8


def model(removed: bool, lora: bool, qlora: bool = False):
    m = tiny_model(
        "mixtral",
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=256,
        num_local_experts=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if removed:
        g = torch.Generator().manual_seed(1)
        hf_moeprune.prune_experts(
            m, {layer: sorted(torch.randperm(64, generator=g)[:32].tolist()) for layer in range(4)}
        )
    if qlora:
        # QLoRA: experts and attention packed in nf4; peft cannot target the packed experts' parameters, so the
        # adapters sit on the attention projections only
        hf_moeprune.quantize(m, scheme="nf4")
        return get_peft_model(
            m, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
    if lora:
        m = get_peft_model(
            m,
            LoraConfig(
                r=16,
                lora_alpha=32,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            ),
        )
    return m


def run(name: str, removed: bool, lora: bool, steps: int, qlora: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, VOCAB, (BATCH * steps, SEQ), generator=g).tolist()})
    data = data.map(lambda row: {"labels": row["input_ids"]})
    m = model(removed, lora, qlora)
    args = MoEPruneArguments(output_dir=tempfile.mkdtemp(prefix="lora-bench-"), max_steps=steps,
                             per_device_train_batch_size=BATCH, learning_rate=1e-4, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, prune_target=0.0, prune_criterion="frequency",
                             prune_report=False, logging_steps=steps, seed=0)  # fmt: skip
    trainer = MoEPruneTrainer(model=m, args=args, train_dataset=data)
    timer, memory = StepTimer(), TrainingMemory(trainer)
    trainer.add_callback(timer)
    trainer.add_callback(memory)
    trainer.train()
    times = sorted(timer.times[2:])
    return {
        "setup": name,
        "experts_per_layer": trainer.moe_model.config.experts_per_layer,
        "total_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "model_bytes": hf_moeprune.model_size_bytes(trainer.model),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "memory": memory.per_step[-1],
        "step_seconds_median": times[len(times) // 2],
        "step_seconds_all": timer.times,
    }


DEMO_LORA = dict(
    r=16,
    lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
)


def demo_run(name: str, model_dir: str, data, steps: int, batch: int, lr: float, **prune) -> tuple:
    from transformers import AutoModelForCausalLM

    m = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**DEMO_LORA))
    with tempfile.TemporaryDirectory(prefix="lora-demo-") as out:
        args = MoEPruneArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                                 learning_rate=lr, warmup_steps=max(1, steps // 10), report_to=[],
                                 save_strategy="no", logging_steps=max(1, steps // 4), disable_tqdm=True, seed=0,
                                 use_cpu=not torch.cuda.is_available(), prune_report=False, **prune)  # fmt: skip
        trainer = MoEPruneTrainer(model=m, args=args, train_dataset=data)
        trainable_start = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        timer, memory = StepTimer(), TrainingMemory(trainer)
        trainer.add_callback(timer)
        trainer.add_callback(memory)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    times = sorted(timer.times[len(timer.times) // 2 :])  # after the removals of a gradual schedule
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    row = {
        "setup": name,
        "experts_per_layer": trainer.moe_model.config.experts_per_layer,
        "total_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "trainable_parameters_start": trainable_start,
        "trainable_parameters_end": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "memory_first_step": memory.per_step[0],
        "memory_last_step": memory.per_step[-1],
        "step_seconds_median_second_half": times[len(times) // 2],
        "train_seconds": round(seconds, 1),
        "logged_train_loss": losses,
    }
    return trainer.model.eval(), row


def demo(cli) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_moeprune.demo import build_corpus, load_or_train_base_model
    from hf_moeprune.demo.pipeline import domain_blocks, held_out_loss

    steps = cli.steps or 40
    started = time.perf_counter()
    model_dir = cli.model or str(load_or_train_base_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prose, held_out = domain_blocks(build_corpus(), tokenizer, cli.eval_blocks)

    def losses(model) -> dict:
        with torch.no_grad():
            return {f"{d}_loss": held_out_loss(model, blocks, 16) for d, blocks in held_out.items()}

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [{"setup": "base (no fine-tune)", "experts_per_layer": [base.config.num_local_experts]
             * base.config.num_hidden_layers, **losses(base)}]  # fmt: skip
    del base
    schedule = dict(prune_target=0.5, prune_criterion="reap", prune_layer_adaptive=False, prune_schedule="gradual",
                    prune_start_step=max(1, steps // 10), prune_end_step=max(2, steps // 2))  # fmt: skip
    for name, prune in (
        ("LoRA r=16 (attention + per-expert)", dict(prune_target=0.0, prune_criterion="reap")),
        ("LoRA r=16 + MoEPruneTrainer, 50% experts removed (REAP, gradual)", schedule),
    ):
        model, row = demo_run(name, model_dir, prose["train"], steps, cli.batch, cli.lr, **prune)
        row.update(losses(model))
        rows.append(row)
        print(f"{name}: prose {row['prose_loss']:.4f} code {row['code_loss']:.4f}", flush=True)
        del model
    result = {
        "command": "python benchmarks/lora_benchmark.py " + shlex.join(sys.argv[1:]),
        "model": f"demo Mixtral ({model_dir})",
        "task": f"fine-tune on stdlib docstrings (prose), {steps} steps of {cli.batch} x 128 tokens, lr {cli.lr}, "
        f"AdamW, fp32; held-out: {cli.eval_blocks} blocks per domain (prose = target, code = forgetting)",
        "schedule": {k: v for k, v in schedule.items()},
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "note": "shared, busy 2-core machine: step times are indicative; memory is counted, not sampled. "
        "One seed, one short budget: a small difference in loss is within run-to-run noise.",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    mib = 1 / 2**20
    lines = [
        "# LoRA + pruning vs LoRA alone on the demo's prose task",
        "",
        f"`{result['command']}` ({result['seconds']} s, {result['device']})",
        "",
        f"Model: {result['model']}. Task: {result['task']}. Pruning: {result['schedule']}. {result['note']}",
        "",
        "| setup | experts/layer (end) | prose loss | code loss | trainable params (start -> end) "
        "| training memory MiB (first -> last step) | step (s, median of 2nd half) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "memory_last_step" not in r:
            lines.append(f"| {r['setup']} | {r['experts_per_layer'][0]} | {r['prose_loss']:.4f} | "
                         f"{r['code_loss']:.4f} | - | - | - |")  # fmt: skip
            continue
        lines.append(
            f"| {r['setup']} | {min(r['experts_per_layer'])}-{max(r['experts_per_layer'])} | {r['prose_loss']:.4f} | "
            f"{r['code_loss']:.4f} | {r['trainable_parameters_start']:,} -> {r['trainable_parameters_end']:,} | "
            f"{r['memory_first_step']['total'] * mib:.1f} -> {r['memory_last_step']['total'] * mib:.1f} | "
            f"{r['step_seconds_median_second_half']:.3f} |"
        )
    (RESULTS / "lora_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 8; --demo: 40)")
    parser.add_argument("--demo", action="store_true", help="LoRA vs LoRA + 50%% pruning on the demo prose task")
    parser.add_argument("--model", default=None, help="--demo: base model folder (default: the demo base model)")
    parser.add_argument("--batch", type=int, default=8, help="--demo: blocks of 128 tokens per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="--demo: peak learning rate of both runs")
    parser.add_argument("--eval-blocks", type=int, default=64, help="--demo: held-out blocks per domain")
    cli = parser.parse_args()
    torch.manual_seed(0)
    if cli.demo:
        demo(cli)
        return
    cli.steps = cli.steps or 8
    rows = [
        run("full fine-tuning", False, False, cli.steps),
        run("full fine-tuning, 50% experts removed", True, False, cli.steps),
        run("LoRA r=16 (attention + per-expert)", False, True, cli.steps),
        run("LoRA r=16, 50% experts removed", True, True, cli.steps),
        run("QLoRA nf4 base, LoRA r=16 (attention)", False, True, cli.steps, qlora=True),
        run("QLoRA nf4 base, LoRA r=16 (attention), 50% experts removed", True, True, cli.steps, qlora=True),
    ]
    result = {
        "command": "python benchmarks/lora_benchmark.py " + shlex.join(sys.argv[1:]),
        "model": "random-init Mixtral, 4 layers x 64 experts, top-2, hidden 256, intermediate 256, vocab 512",
        "batch": f"{BATCH} x {SEQ} tokens, fp32, AdamW, CPU",
        "rows": rows,
        "not_measured": "QLoRA with per-expert LoRA (peft cannot target packed expert tensors); "
        "held-out loss of LoRA+pruning vs LoRA on the demo's prose task is measured by --demo (lora_demo.md).",
        "note": "shared, busy 2-core machine: step times are indicative; memory is counted, not sampled.",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora.json").write_text(json.dumps(result, indent=2) + "\n")
    mib = 1 / 2**20
    lines = [
        "# Full fine-tuning vs LoRA, with and without 50% of the experts removed",
        "",
        f"`{result['command']}`",
        "",
        f"Model: {result['model']}. Batch: {result['batch']}. {result['note']}",
        "",
        "| setup | experts/layer | trainable params | model (MiB) | training memory (MiB) | of which params+grads+Adam "
        "| step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = r["memory"]
        states = (mem["params"] + mem["grads"] + mem["optimizer"]) * mib
        lines.append(
            f"| {r['setup']} | {r['experts_per_layer'][0]} | {r['trainable_parameters']:,} | "
            f"{r['model_bytes'] * mib:.1f} | "
            f"{mem['total'] * mib:.1f} | {states:.1f} | {r['step_seconds_median']:.3f} |"
        )
    lines += ["", f"Not measured: {result['not_measured']}"]
    (RESULTS / "lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
