"""The CUDA check of MoEPruneTrainer under the Trainer's own FSDP2 path (which refuses CPU, so CI cannot run it).

On a machine with N >= 1 GPUs:

    PYTHONPATH=. timeout 600 torchrun --standalone --nproc_per_node N tests/scripts/cuda_fsdp2_trainer.py OUT

It trains a tiny Mixtral with `fsdp=True, fsdp_config={"fsdp_version": 2, ...}` (accelerate's fully_shard per
decoder layer), removes experts at step 2 (8 -> 6 per layer), keeps training to step 6 with a sharded checkpoint
at step 4, resumes from that checkpoint in a second trainer, and saves the final model once. It then checks, and
exits non-zero on the first failure:

- the experts and routers are still FSDP2 DTensors after the removal, on every rank the same layout;
- the kept experts' weights change after the removal (training genuinely continues on the pruned model);
- the resumed run starts from the checkpoint's pruned layout and finishes;
- `save_model` wrote one full pruned model that `AutoModelForCausalLM.from_pretrained` loads with 6 experts per
  layer and whose logits equal the trained model's.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

import hf_moeprune  # noqa: F401  (registers the pruned classes)
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.distributed import is_sharded
from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    if dist.get_rank() == 0:
        print(f"ok: {what}", flush=True)


def full(t):
    return (t.full_tensor() if is_sharded(t) else t).detach().float().cpu().clone()


class AfterRemoval(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.weights, self.sharded = trainer, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:  # runs after the trainer's own step end, i.e. after the removal
            experts = self.trainer.model.model.layers[0].mlp.experts
            self.weights = full(experts.gate_up_proj)
            self.sharded = is_sharded(experts.gate_up_proj) and is_sharded(
                self.trainer.model.model.layers[0].mlp.gate.weight
            )


def arguments(out: Path, steps: int) -> MoEPruneArguments:
    return MoEPruneArguments(
        output_dir=str(out / "run"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="steps",
        save_steps=4,
        seed=0,
        prune_target=0.25,
        prune_start_step=2,
        prune_end_step=2,
        disable_tqdm=True,
        logging_steps=100,
        bf16=False,
        fsdp=True,
        fsdp_config={
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": ["MixtralDecoderLayer"],
            "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    )


def main(out: str) -> None:
    out = Path(out)
    ids = ((torch.arange(64).unsqueeze(1) * 7 + torch.arange(32)) % 128).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})

    trainer = MoEPruneTrainer(model=tiny_model("mixtral"), args=arguments(out, 6), train_dataset=dataset)
    after = AfterRemoval(trainer)
    trainer.add_callback(after)
    trainer.train()
    check(trainer.is_fsdp_enabled, "the Trainer ran FSDP2")
    check(trainer.model.config.experts_per_layer == [6, 6, 6], "8 -> 6 experts per layer")
    check(bool(after.sharded), "experts and router stay FSDP2 DTensors after the removal")
    final = full(trainer.model.model.layers[0].mlp.experts.gate_up_proj)
    changed = [not torch.equal(final[i], after.weights[i]) for i in range(final.shape[0])]
    check(all(changed), f"every kept expert trained after the removal ({changed})")
    layouts = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, trainer.model.config.kept_expert_ids)
    check(all(layout == layouts[0] for layout in layouts), "every rank keeps the same experts")

    # resume from the sharded checkpoint (step 4, already pruned) in a fresh trainer on a fresh unpruned model
    resumed = MoEPruneTrainer(model=tiny_model("mixtral"), args=arguments(out, 6), train_dataset=dataset)
    resumed.train(resume_from_checkpoint=str(out / "run" / "checkpoint-4"))
    check(resumed.model.config.kept_expert_ids == layouts[0], "resume rebuilt the checkpoint's expert layout")
    check(resumed.state.global_step == 6, "resumed training ran to the end")

    resumed.save_model(str(out / "final"))
    dist.barrier()
    loaded = AutoModelForCausalLM.from_pretrained(out / "final").to(torch.cuda.current_device()).eval()
    check(loaded.config.experts_per_layer == [6, 6, 6], "save_model wrote the full pruned model once")
    probe = torch.arange(3, 35, device=loaded.device).reshape(2, 16)
    resumed.model.eval()
    with torch.no_grad():
        diff = (loaded(input_ids=probe).logits - resumed.model(input_ids=probe).logits).abs().max()
    check(float(diff) < 1e-4, f"the saved model's logits equal the trained one's (max diff {float(diff):.2e})")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA: the Trainer's FSDP path refuses CPU (the CPU tests cover surgery on fully_shard)")
    main(sys.argv[1])
