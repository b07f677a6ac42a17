"""Run under `torchrun --nproc_per_node 2`: prune while training with DDP on CPU (gloo); each rank writes
what it saw to OUT/rank<r>.json for tests/test_multiprocess.py to compare."""

import gc
import hashlib
import json
import sys
import weakref
from pathlib import Path

import torch
from datasets import Dataset
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import TrainerCallback

from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.training import MoEPruneTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared training arguments
from train_args import train_args  # noqa: E402


class SyncRecorder(TrainerCallback):
    """After the first removal, record for every gradient all-reduce of the (rebuilt) DDP wrapper whether the
    training loop meant this micro-step to synchronise (the last of a gradient-accumulation window)."""

    def __init__(self, trainer, original):
        self.trainer = trainer
        self.original = original
        self.flags: list[bool] = []
        self.alive_after_removal: list[bool] = []
        self.hooked = None
        self.first_wrapper = self.first_reducer = None

    def on_train_begin(self, args, state, control, **kwargs):
        # the DDP wrapper and reducer the training loop starts with; weak references, so that they keep no
        # replaced tensor alive
        self.first_wrapper = weakref.ref(self.trainer.model_wrapped)
        self.first_reducer = weakref.ref(self.trainer.model_wrapped.reducer)

    def rewrapped(self) -> bool:
        """Seen from outside the trainer: DDP was rebuilt in place (the training loop's wrapper object is still
        the one it started with, but it holds a new reducer, built over the new parameters)."""
        wrapper = self.trainer.model_wrapped
        return wrapper is self.first_wrapper() and wrapper.reducer is not self.first_reducer()

    def on_step_end(self, args, state, control, **kwargs):
        wrapper = self.trainer.model_wrapped
        if self.rewrapped():
            # while training goes on (the loop still holds its wrapper), the replaced tensor must be gone
            gc.collect()
            self.alive_after_removal.append(self.original() is not None)
        if self.rewrapped() and self.hooked is not wrapper.reducer:
            self.hooked = wrapper.reducer
            wrapper.register_comm_hook(None, self.hook)

    def hook(self, process_group, bucket):
        self.flags.append(bool(self.trainer.accelerator.sync_gradients))
        return default_hooks.allreduce_hook(process_group, bucket)


def main(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 100, (64, 1), generator=g)
    ids = ((start + torch.arange(16)) % 128).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = train_args(
        Path(out) / "run",
        max_steps=8,
        prune_target=0.5,
        prune_schedule="gradual",
        prune_start_step=2,
        prune_end_step=5,
        prune_allocation="global",
        logging_steps=100,
        gradient_accumulation_steps=2,
    )
    model = tiny_model("mixtral")
    # the original full-size expert tensor: once experts are removed nothing may keep it alive
    original_experts = weakref.ref(model.model.layers[0].mlp.experts.gate_up_proj)
    trainer = MoEPruneTrainer(model=model, args=args, train_dataset=dataset)
    syncs = SyncRecorder(trainer, original_experts)
    trainer.add_callback(syncs)
    local_tokens = {}

    trainer.train()
    rank = trainer.args.process_index
    for layer, stats in trainer.statistics.snapshot().items():
        local_tokens[layer] = stats.tokens.tolist()
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    record = {
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapper": type(trainer.model_wrapped).__name__,
        "rewrapped": syncs.rewrapped(),
        "global_step": trainer.state.global_step,
        "kept_expert_ids": trainer.model.config.kept_expert_ids,
        "events": [(e.step, e.layer, e.original_ids) for e in trainer.controller.events],
        "local_tokens": local_tokens,
        "weights_sha256": digest.hexdigest(),
        "original_experts_alive_after_removal": syncs.alive_after_removal,
        # one entry per gradient all-reduce after the first removal: was it a micro-step meant to sync?
        "allreduce_on_sync_step": syncs.flags,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
