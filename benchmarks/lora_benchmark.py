"""Full fine-tuning vs LoRA vs QLoRA, each on the whole model and with 50% of the routed experts removed.

python benchmarks/lora_benchmark.py [--steps 8]

Model: a random-init expert-heavy Mixtral (4 layers x 64 experts, top-2, hidden 256; ~95% of its parameters in
experts), random token batches (8 x 64 tokens). "50% removed" keeps 32 experts per layer (chosen at random) before
training, i.e. the model the trainer continues with after a removal. Every run is MoEPruneTrainer (prune_target 0,
frequency statistics, so the same instrumentation in all rows) with AdamW, fp32, CPU. Measured per run: trainable
parameters, training memory of the last step (parameters + gradients + optimizer state + saved activations, from
benchmarks_common.TrainingMemory), the model's stored bytes (packed codes + scales for QLoRA) and the median step
time of the steps after the first two. QLoRA rows: experts and attention packed in nf4 by hf_moeprune.quantize
(after the removal), LoRA r=16 on the attention projections (peft cannot target packed expert tensors).
Writes benchmarks/results/lora.{json,md}. Timings come from a shared, busy 2-core machine: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from benchmarks_common import StepTimer, TrainingMemory  # noqa: E402

import hf_moeprune  # noqa: E402
from hf_moeprune.tiny_models import tiny_model  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    cli = parser.parse_args()
    torch.manual_seed(0)
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
        "held-out loss of LoRA+pruning vs LoRA on the demo's prose task was not run in this round.",
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
