"""Run under `torchrun --nproc_per_node 2`: expert removal and permutation on a model sharded with FSDP2
`fully_shard` (CPU, gloo), checked against the same surgery on an unsharded copy of the same weights and
optimizer state. Each rank writes OUT/rank<r>.json for tests/test_multiprocess.py."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from hf_moeprune import permute_experts, prune_experts
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.distributed import is_sharded
from hf_moeprune.training.optim import OptimizerStateSlicer

KEEP = {0: [6, 1, 4, 3, 7], 2: [2, 5, 0, 7]}  # 5 of 8 (uneven over 2 ranks: FSDP pads), 4 of 8
ORDER = {1: [7, 6, 5, 4, 3, 2, 1, 0]}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_sharded(t) else t


def step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def gathered_state(model, optimizer) -> tuple[dict, dict]:
    """Every parameter and AdamW moment, whole (all-gathered) and keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    weights = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    moments = {
        names[id(p)]: {k: full(v).clone() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0}
        for p, s in optimizer.state.items()
    }
    return weights, moments


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(3, 128, (2, 16), generator=g) for _ in range(4)]
    for ids in batches[:2]:
        step(model, optimizer, ids)

    # the reference: an unsharded model holding exactly the sharded one's weights and AdamW state
    weights, moments = gathered_state(model, optimizer)
    reference = tiny_model("mixtral")
    reference.load_state_dict(weights)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    ref_params = dict(reference.named_parameters())
    for name, state in moments.items():
        ref_optimizer.state[ref_params[name]] = {"step": torch.tensor(2.0), **copy.deepcopy(state)}

    local_rows_before = model.model.layers[0].mlp.experts.gate_up_proj.to_local().shape[0]
    prune_experts(model, KEEP, on_tensor_replaced=OptimizerStateSlicer(optimizer))
    permute_experts(model, ORDER, on_tensor_replaced=OptimizerStateSlicer(optimizer))
    prune_experts(reference, KEEP, on_tensor_replaced=OptimizerStateSlicer(ref_optimizer))
    permute_experts(reference, ORDER, on_tensor_replaced=OptimizerStateSlicer(ref_optimizer))

    expert_params = [p for n, p in model.named_parameters() if ".mlp." in n]
    holds_new = all(any(p is q for q in optimizer.param_groups[0]["params"]) for p in expert_params)
    weights, moments = gathered_state(model, optimizer)
    ref_weights, ref_moments = gathered_state(reference, ref_optimizer)
    probe = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        logits, ref_logits = model(input_ids=probe).logits, reference(input_ids=probe).logits
    experts = model.model.layers[0].mlp.experts
    record = {
        "rank": rank,
        "world": world,
        "sharded_after": is_sharded(experts.gate_up_proj) and is_sharded(model.model.layers[0].mlp.gate.weight),
        "local_rows_before": local_rows_before,
        "local_rows_after": experts.gate_up_proj.to_local().shape[0],
        "global_shape_after": list(experts.gate_up_proj.shape),
        "experts_per_layer": model.config.experts_per_layer,
        "kept_expert_ids": model.config.kept_expert_ids,
        "weights_equal": sorted(weights) == sorted(ref_weights)
        and all(torch.equal(weights[n], ref_weights[n]) for n in weights),
        "moments_equal": sorted(moments) == sorted(ref_moments)
        and all(torch.equal(moments[n][k], ref_moments[n][k]) for n in moments for k in moments[n]),
        "moment_names": sorted(moments),
        "optimizer_holds_new_params": holds_new and len(optimizer.state) == len(ref_optimizer.state),
        "logits_equal": torch.equal(logits, ref_logits),
        "max_logit_diff": float((logits - ref_logits).abs().max()),
    }
    # training goes on: the sharded model and the reference take the same two steps on the same global batch
    before = full(experts.gate_up_proj.detach()).clone()
    everyone = [torch.empty_like(batches[0]) for _ in range(world)]
    for ids in batches[2:]:
        step(model, optimizer, ids)
        dist.all_gather(everyone, ids)
        reference(input_ids=torch.cat(everyone), labels=torch.cat(everyone)).loss.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    after = full(experts.gate_up_proj.detach())
    record["experts_changed_after_removal"] = [not torch.equal(before[i], after[i]) for i in range(after.shape[0])]
    weights, _ = gathered_state(model, optimizer)
    ref_weights, _ = gathered_state(reference, ref_optimizer)
    record["max_weight_diff_after_training"] = max(float((weights[n] - ref_weights[n]).abs().max()) for n in weights)
    record["weights_digest"] = float(sum(w.double().sum() for w in weights.values()))
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
