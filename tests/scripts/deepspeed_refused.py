"""Run under `torchrun --nproc_per_node 2` (CPU, gloo, DS_ACCELERATOR=cpu): MoEPruneTrainer refuses DeepSpeed ZeRO-2
(when experts are to be removed) and ZeRO-3 before training starts, naming the setup. Each rank writes
OUT/rank<r>.json for tests/test_multiprocess.py."""

import json
import sys
from pathlib import Path

import deepspeed.ops
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.distributed import DistributedSetupError
from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer

# DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op on first use (minutes on a 2-core
# machine) after probing every op with compiler subprocesses; gloo does the same job here, so the probe's
# answer is given up front (the dict DeepSpeed caches on first access, deepspeed 0.19.8)
deepspeed.ops.__dict__.setdefault("__compatible_ops__", {"deepspeed_shm_comm": False})


def ds_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        # explicit (not "auto"): zero.Init inside from_pretrained reads the config before any Trainer fills it in
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "comms_logger": {"enabled": False},
    }


def attempt(out: Path, stage: int, prune_target: float, load_under_zero: bool) -> dict:
    args = MoEPruneArguments(
        output_dir=str(out / f"run{stage}_{prune_target}"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        prune_target=prune_target,
        prune_start_step=1,
        prune_end_step=1,
        disable_tqdm=True,
        deepspeed=ds_config(stage),
    )
    # under ZeRO-3 the TrainingArguments above make from_pretrained partition the model (zero.Init)
    model = AutoModelForCausalLM.from_pretrained(out / "model") if load_under_zero else tiny_model("mixtral")
    ids = ((torch.arange(8).unsqueeze(1) + torch.arange(16)) % 128).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    record = {"stage": stage, "placeholders": any(p.numel() == 0 for p in model.parameters())}
    try:
        trainer = MoEPruneTrainer(model=model, args=args, train_dataset=dataset)
    except DistributedSetupError as error:
        record.update(refused=True, message=str(error))
        return record
    record["refused"] = False
    trainer.train()
    record["global_step"] = trainer.state.global_step
    return record


def main(out: str) -> None:
    out = Path(out)
    if not (out / "model").exists():
        tiny_model("mixtral").save_pretrained(out / "model")  # both ranks: identical weights, same files
    records = [attempt(out, 2, 0.25, False), attempt(out, 3, 0.25, True)]
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1])
