"""Expert surgery on sharded models: FSDP2 ``fully_shard``, transformers' expert parallelism, DeepSpeed checks.

Expert tensors of a sharded model are DTensors split on the expert dim (``Shard(0)``): FSDP2 spreads every
parameter over the data-parallel ranks, transformers' ``DistributedConfig(ep_size=N)`` gives each rank a
contiguous block of experts. Removing or reordering experts selects rows *across* shards, so each tensor is
all-gathered on its own, its kept rows selected, and the result sharded again with the same placement:
at most one layer tensor is ever whole on a rank, never the model.

The private torch/transformers APIs this needs live in ``hf_moeprune.compat``, each with why and the version it
was checked against (torch 2.13, transformers 5.24). In short:

- FSDP2 keeps, per parameter, an ``FSDPParam`` holding the padded local shard, sizes and the registered
  DTensor. A parameter whose global shape changes must be re-initialised there
  (``FSDPParam._init_sharded_param``), which is what ``fully_shard`` itself runs at wrap time.
- transformers' expert parallelism sets ``experts.num_experts`` to the *local* count and, for
  ``ep_dispatch_experts`` plans, builds the token exchange once (each ``EPImplementation`` caches the local
  count), so both are updated after the count changes. Its expert DTensors are FSDP2-managed too (FSDP2 over
  the expert-parallel mesh); they are rebuilt as expert-parallel DTensors and handed to FSDP again.

DeepSpeed ZeRO keeps its own flat partitions of parameters and optimizer state; ``check_trainer_setup``
refuses it before training instead of letting the MoE layers silently stop training.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from hf_moeprune import compat

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedSetupError",
    "ShardedSurgery",
    "check_expert_parallel_count",
    "check_trainer_setup",
    "deepspeed_setup",
    "expert_parallel_size",
    "is_sharded",
    "reshard_like",
    "select_rows",
]


class DistributedSetupError(RuntimeError):
    """A distributed setup that expert removal cannot run in; the message names the setup."""


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    """True for a DTensor (an FSDP2 or expert-parallel shard), whose rows may live on other ranks."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(tensor, cls)


def _fsdp_params(model: nn.Module) -> dict[int, object]:
    """``id(sharded parameter) -> FSDPParam`` for every FSDP2-managed parameter of ``model``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return {}
    out = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = compat.fsdp_param_group(module)
        if group is None:
            continue
        for fsdp_param in group.fsdp_params:
            out[id(fsdp_param.sharded_param)] = fsdp_param
    return out


def _reinit_fsdp_param(fsdp_param, full: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """Give an FSDP2 parameter a new global value of a new shape; returns the new sharded parameter.

    The private FSDP2 calls are in ``compat.reinit_fsdp_param``.
    """
    fqn = compat.fsdp_param_fqn(fsdp_param)
    if not compat.fsdp_param_is_resharded(fsdp_param):
        raise DistributedSetupError(
            f"FSDP2 parameter {fqn} is {fsdp_param.sharded_state.name}, not resharded; expert "
            "removal runs between optimizer steps, outside forward/backward (use reshard_after_forward or call "
            "model.reshard() first)"
        )
    if fsdp_param.fsdp_placement.dim != 0:
        raise DistributedSetupError(
            f"FSDP2 shards {fqn} on dim {fsdp_param.fsdp_placement.dim}; expert surgery needs "
            "Shard(0) (the expert dim), FSDP2's default: drop the custom shard_placement_fn for expert tensors"
        )
    spec = compat.fsdp_unsharded_dtensor_spec(fsdp_param)  # set when FSDP2 wraps a DTensor (expert/tensor parallelism)
    value = full.contiguous()
    if spec is not None:
        # transformers' expert parallelism: FSDP2 shards each rank's expert block further (efsdp); rebuild the
        # expert-parallel DTensor first, then let FSDP shard it as it did at load time
        value = _distribute(value, spec.mesh, spec.placements)
    param = nn.Parameter(value, requires_grad=requires_grad)
    return compat.reinit_fsdp_param(fsdp_param, param)


def _distribute(full: torch.Tensor, mesh, placements):
    from torch.distributed.tensor import Replicate, distribute_tensor

    try:
        return distribute_tensor(full, mesh, placements, src_data_rank=None)
    except (NotImplementedError, RuntimeError):
        # placements distribute_tensor cannot build directly (FSDP2-over-EP's _StridedShard): replicate, then
        # redistribute, which only takes local chunks
        replicated = distribute_tensor(full, mesh, [Replicate()] * mesh.ndim, src_data_rank=None)
        return replicated.redistribute(mesh, placements)


def reshard_like(full: torch.Tensor, like) -> torch.Tensor:
    """``full`` (the same on every rank) as a DTensor with ``like``'s mesh and placements, no communication."""
    return _distribute(full, like.device_mesh, like.placements)


def select_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[index]`` along dim 0 as a plain tensor; a DTensor is all-gathered first (a collective)."""
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().index_select(0, index.to(tensor.device))


class ShardedSurgery:
    """Replaces sharded (DTensor) per-expert tensors of one model, one tensor at a time.

    Built once per surgery call: it indexes the model's FSDP2 parameters. ``replace`` selects the kept rows
    across shards and re-shards them: FSDP2 parameters through FSDP's own per-parameter state (so the next
    all-gather and reduce-scatter use the new sizes), other DTensors (transformers' expert parallelism) by
    re-distributing with the same placements. ``finish_layer`` fixes what expert parallelism derives from
    the count.
    """

    def __init__(self, model: nn.Module):
        self.fsdp = _fsdp_params(model)

    def replace(self, owner: nn.Module, attr: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old = getattr(owner, attr)
        full = select_rows(old, index)
        fsdp_param = self.fsdp.pop(id(old), None)
        if fsdp_param is not None:
            new = _reinit_fsdp_param(fsdp_param, full, old.requires_grad)
            self.fsdp[id(new)] = fsdp_param
        else:
            new = reshard_like(full, old)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
                setattr(owner, attr, new)
            else:
                persistent = compat.buffer_is_persistent(owner, attr)
                owner.register_buffer(attr, new, persistent=persistent)
        del full
        return old, new

    @staticmethod
    def finish_experts(experts: nn.Module, num_experts: int) -> None:
        """After the count attributes were set to the global ``num_experts``: transformers' expert parallelism wants
        the local count, in the module and in the token dispatch built for the old count."""
        if not compat.is_expert_parallel(experts):
            return
        ep_size = expert_parallel_size(experts)
        # private (transformers 5.24): MoEParamShard.shard_param sets num_experts to the local count
        experts.num_experts = num_experts // ep_size
        for dispatch in compat.ep_dispatches(experts):
            dispatch.num_local_experts = experts.num_experts


def check_expert_parallel_count(experts: nn.Module, num_experts: int, layer: int) -> None:
    """Under transformers' expert parallelism every rank holds the same number of experts: refuse other counts."""
    ep_size = expert_parallel_size(experts)
    if num_experts % ep_size:
        raise DistributedSetupError(
            f"layer {layer}: {num_experts} experts cannot be split evenly over ep_size={ep_size} expert-parallel "
            f"ranks; keep a multiple of {ep_size} (the trainer does with balance_ep_size={ep_size})"
        )


def expert_parallel_size(experts: nn.Module) -> int:
    """How many expert-parallel ranks share this experts module's experts (1 without expert parallelism)."""
    if not compat.is_expert_parallel(experts):
        return 1
    fsdp = _fsdp_params(experts)
    for param in experts.parameters(recurse=False):
        spec = compat.fsdp_unsharded_dtensor_spec(fsdp.get(id(param)))
        mesh = spec.mesh if spec is not None else getattr(param, "device_mesh", None)
        if mesh is not None:
            return mesh.size()
    return 1


def deepspeed_setup(args=None) -> str | None:
    """A description of the DeepSpeed setup a Trainer would run in ("DeepSpeed ZeRO-2 (ds.json)"), or None.

    Covers ``TrainingArguments(deepspeed=...)`` (a file or a dict) and ``accelerate launch`` with a DeepSpeed
    config (which exports ``ACCELERATE_USE_DEEPSPEED`` and ``ACCELERATE_DEEPSPEED_ZERO_STAGE``).
    """
    config = getattr(args, "deepspeed", None) if args is not None else None
    stage = None
    if config is None:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() not in ("1", "true", "yes"):
            return None
        config, stage = "accelerate config", os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    elif isinstance(config, dict):
        stage = config.get("zero_optimization", {}).get("stage")
    elif os.path.isfile(str(config)):
        with open(config) as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage")
    where = config if isinstance(config, str) else "dict"
    return f"DeepSpeed ZeRO-{stage if stage is not None else '?'} ({where})"


def check_trainer_setup(model: nn.Module, args) -> None:
    """Refuse, before training starts, the distributed setups in which the trainer cannot remove experts.

    DeepSpeed ZeRO keeps flat, partitioned fp32 copies of the parameters and of the optimizer moments that are
    built once from the shapes at ``deepspeed.initialize``; after a removal the engine would go on updating
    its own copies while the model's new expert and router tensors are never trained again (the silent
    failure of issue 12). ZeRO-3 also replaces every parameter by an empty placeholder, so nothing can even
    count the experts. Both are refused here, naming the setup.
    """
    ep_sizes = {expert_parallel_size(m) for m in model.modules() if compat.is_expert_parallel(m)}
    if ep_sizes and getattr(args, "prune_target", 0) > 0:
        ep_size = max(ep_sizes)
        if getattr(args, "balance_ep_size", 0) != ep_size:
            raise DistributedSetupError(
                f"the model runs under transformers' expert parallelism with ep_size={ep_size}, but "
                f"balance_ep_size={getattr(args, 'balance_ep_size', 0)}: set balance_ep_size={ep_size} so that every "
                "layer keeps a multiple of ep_size experts and each removal re-places the experts by load across the "
                "expert-parallel ranks"
            )
    ds = deepspeed_setup(args)
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 placeholders (zero.Init)
    if partitioned or (ds is not None and "ZeRO-3" in ds):
        setup = ds or "DeepSpeed ZeRO-3 (the model was loaded under zero.Init: its parameters are ZeRO-3 partitions)"
        raise DistributedSetupError(
            f"MoEPruneTrainer cannot run under {setup}: ZeRO-3 partitions every parameter (they are empty "
            "placeholders outside forward), so experts can be neither counted nor removed. " + _ALTERNATIVES
        )
    if ds is not None and getattr(args, "prune_target", 0) > 0:
        raise DistributedSetupError(
            f"MoEPruneTrainer cannot remove experts under {ds}: DeepSpeed keeps flattened, partitioned "
            "copies of the parameters and optimizer state that do not follow a change of shape, so the pruned MoE "
            "layers would silently stop training. " + _ALTERNATIVES + " (prune_target=0, which removes nothing, "
            "is not refused under ZeRO-1/2)"
        )


_ALTERNATIVES = (
    "Use FSDP2 (accelerate launch --use_fsdp --fsdp_version 2, or TrainingArguments fsdp with "
    'fsdp_config={"fsdp_version": 2}), DDP, or transformers\' expert parallelism '
    "(hf_moeprune.balancing.load_expert_parallel); or prune without DeepSpeed and fine-tune the pruned model "
    "with DeepSpeed afterwards"
)
