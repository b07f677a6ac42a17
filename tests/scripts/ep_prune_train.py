"""Run under `torchrun --nproc_per_node 2`: MoEPruneTrainer on a model loaded with transformers' expert parallelism
(`load_expert_parallel`, ep_size=2, CPU/gloo), removing experts during training. Each rank writes OUT/rank<r>.json
for tests/test_multiprocess.py."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import TrainerCallback

from hf_moeprune import prune_experts
from hf_moeprune.balancing import load_expert_parallel
from hf_moeprune.compat import ep_dispatches as _ep_dispatches
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.distributed import DistributedSetupError, is_sharded
from hf_moeprune.training import MoEPruneTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared training arguments
from train_args import train_args  # noqa: E402

REMOVAL_STEP = 2


def experts_by_id(model) -> dict[int, dict[int, torch.Tensor]]:
    """layer -> original expert id -> its gate_up_proj rows, gathered from every rank."""
    out = {}
    for layer, ids in enumerate(model.config.kept_expert_ids):
        weight = model.model.layers[layer].mlp.experts.gate_up_proj
        whole = weight.full_tensor() if is_sharded(weight) else weight
        out[layer] = {i: whole[p].detach().clone() for p, i in enumerate(ids)}
    return out


class Snapshot(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.taken: dict[str, dict] = {}
        self.local: dict[str, list] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == REMOVAL_STEP:
            key = "after" if "before" in self.taken else "before"
            model = self.trainer.model
            self.taken[key] = experts_by_id(model)
            self.local[key] = [m.mlp.experts.num_experts for m in model.model.layers]


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(out)
    if rank == 0:
        tiny_model("mixtral").save_pretrained(out / "model")
    dist.barrier()
    model = load_expert_parallel(str(out / "model"), ep_size=2)
    try:  # 5 experts cannot be split over 2 ranks: refused before anything changes
        prune_experts(model, {0: [0, 1, 2, 3, 4]})
        uneven_refused = False
    except DistributedSetupError as error:
        uneven_refused = "ep_size=2" in str(error) and model.model.layers[0].mlp.gate.weight.shape[0] == 8
    g = torch.Generator().manual_seed(0)
    ids = ((torch.randint(0, 100, (48, 1), generator=g) + torch.arange(16)) % 128).tolist()
    args = train_args(
        out / "run",
        max_steps=5,
        learning_rate=5e-3,
        prune_target=0.25,
        prune_start_step=REMOVAL_STEP,
        prune_end_step=REMOVAL_STEP,
        balance_ep_size=2,
        logging_steps=100,
    )
    trainer = MoEPruneTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
    )
    snapshot = Snapshot(trainer)
    # one snapshot just before the trainer's own step-end (the removal), one just after it
    trainer.callback_handler.callbacks.insert(0, snapshot)
    trainer.add_callback(snapshot)
    trainer.train()
    final = experts_by_id(trainer.model)
    before, after = snapshot.taken["before"], snapshot.taken["after"]
    layers = trainer.model.model.layers
    record = {
        "rank": rank,
        "uneven_refused": uneven_refused,
        "wrapper": type(trainer.model_wrapped).__name__,
        "global_step": trainer.state.global_step,
        "experts_per_layer": trainer.model.config.experts_per_layer,
        "kept_expert_ids": trainer.model.config.kept_expert_ids,
        "local_experts_before": snapshot.local["before"],
        "local_experts_after": snapshot.local["after"],
        "local_rows": [layer.mlp.experts.gate_up_proj.to_local().shape[0] for layer in layers],
        "events": [(e.step, e.layer, e.original_ids) for e in trainer.controller.events],
        # every kept expert's weights moved with it (wherever the re-placement put it), unchanged by the move
        "weights_followed_ids": all(
            torch.equal(after[layer][i], before[layer][i]) for layer in after for i in after[layer]
        ),
        "order_changed": [[i for i in before[layer] if i in after[layer]] != list(after[layer]) for layer in after],
        # and keep training afterwards
        "kept_changed_after_removal": [
            sum(not torch.equal(final[layer][i], after[layer][i]) for i in after[layer]) for layer in after
        ],
        "kept_per_layer": [len(after[layer]) for layer in after],
        "balancedness": [v for log in trainer.state.log_history for k, v in log.items() if "balancedness" in k],
    }
    # the pruned, re-placed model under expert parallelism computes what the same weights compute in one process
    # (so the token dispatch routes to the experts' new homes with the new local count)
    model = trainer.model.eval()
    gathered = {n: (t.full_tensor() if is_sharded(t) else t).detach() for n, t in model.state_dict().items()}
    reference = tiny_model("mixtral")
    prune_experts(reference, dict(enumerate(model.config.kept_expert_ids)))
    missing, unexpected = reference.load_state_dict(gathered, strict=False)
    probe = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        diff = (model(input_ids=probe).logits - reference.eval()(input_ids=probe).logits).abs().max()
    # the token exchange transformers built for 4 local experts now splits 3 per rank (AutoEP holds two)
    record["dispatch_local"] = [sorted(d.num_local_experts for d in _ep_dispatches(m.mlp.experts)) for m in layers]
    record.update(reference_missing=missing, reference_unexpected=unexpected, max_logit_diff_vs_unsharded=float(diff))
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
