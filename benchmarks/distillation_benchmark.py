"""Does distillation from the unpruned model recover a pruned model's held-out loss?

Teacher: the demo Mixtral (pretrained on stdlib code + docstrings). Student: the same model with 50% / 75% of
its routed experts removed one-shot (REAP on prose calibration blocks). The student is distilled on prose
(a*CE + (1-a)*T^2*KL, a=0.5, T=2) and, as a control with the same budget, fine-tuned with plain CE.
Reported: held-out prose and code loss of teacher, pruned student, distilled student, CE-only student, and
the share of the gap to the teacher that was recovered.

    python benchmarks/distillation_benchmark.py     # writes benchmarks/results/distillation.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_moeprune
from hf_moeprune.demo import build_corpus, load_or_train_base_model
from hf_moeprune.demo.pipeline import domain_blocks, held_out_loss
from hf_moeprune.distillation import MoEDistillArguments, MoEDistillTrainer
from hf_moeprune.oneshot import collect_statistics, plan_oneshot

RESULTS = Path(__file__).parent / "results"


def train(student, teacher, data, steps, batch, distill: bool):
    common = dict(max_steps=steps, per_device_train_batch_size=batch, learning_rate=5e-4, report_to=[],
                  save_strategy="no", disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available())  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        if distill:
            args = MoEDistillArguments(output_dir=out, alpha=0.5, temperature=2.0, **common)
            trainer = MoEDistillTrainer(model=student, args=args, train_dataset=data, teacher_model=teacher)
        else:
            trainer = Trainer(model=student, args=TrainingArguments(output_dir=out, **common), train_dataset=data)
        trainer.train()
    return trainer.model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sparsities", default="0.5,0.75")
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "distillation"))
    opts = parser.parse_args()
    model_dir = opts.model or str(load_or_train_base_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prose, held_out = domain_blocks(build_corpus(), tokenizer, opts.eval_blocks)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor(prose["train"].select(range(64))["input_ids"])
    stats = collect_statistics(teacher, [{"input_ids": ids[i : i + 16]} for i in range(0, 64, 16)], progress=False)

    def losses(model):
        return {domain: held_out_loss(model, blocks, opts.batch) for domain, blocks in held_out.items()}

    rows = [{"model": "teacher (unpruned)", "sparsity": 0.0, **losses(teacher)}]
    for sparsity in [float(s) for s in opts.sparsities.split(",")]:
        pruned = copy.deepcopy(teacher).requires_grad_(True)  # the distiller froze the teacher in place
        hf_moeprune.prune_experts(pruned, plan_oneshot(pruned, stats, "reap", sparsity))
        rows.append({"model": "pruned (REAP one-shot)", "sparsity": sparsity, **losses(pruned)})
        for distill in (True, False):
            student = train(copy.deepcopy(pruned), teacher, prose["train"], opts.steps, opts.batch, distill)
            rows.append({"model": "distilled" if distill else "CE fine-tune (control)", "sparsity": sparsity,
                         **losses(student)})  # fmt: skip
    teacher_prose = rows[0]["prose"]
    for row in rows:
        pruned_row = next(
            (r for r in rows if r["sparsity"] == row["sparsity"] and r["model"].startswith("pruned")), None
        )
        if pruned_row is not None and row is not pruned_row and pruned_row["prose"] != teacher_prose:
            row["gap_recovered"] = (pruned_row["prose"] - row["prose"]) / (pruned_row["prose"] - teacher_prose)
    result = {"command": "python " + " ".join(sys.argv), "model": model_dir, "steps": opts.steps, "rows": rows}
    out = Path(opts.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Distillation recovery",
        "",
        f"Command: `{result['command']}`  ",
        f"Teacher: demo Mixtral (`{model_dir}`); students distilled / fine-tuned {opts.steps} steps of "
        f"{opts.batch} x 128 prose tokens; held-out {opts.eval_blocks} blocks per domain.",
        "",
        "| model | removed | prose loss | code loss | prose gap to teacher recovered |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        rec = f"{r['gap_recovered'] * 100:.0f}%" if "gap_recovered" in r else "-"
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['prose']:.4f} | {r['code']:.4f} | {rec} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
