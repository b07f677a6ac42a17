"""Run a model under transformers' own expert parallelism, and count the work each rank's experts really do.

transformers v5 shards experts with ``DistributedConfig(ep_size=N)``: rank ``r`` holds the contiguous block
``[r * E/N, (r+1) * E/N)`` of every MoE layer (per layer, so pruned models whose layers keep different
counts work as long as each count divides by N). ``plan_placement`` + ``permute_experts`` choose which
experts share a block; this module checks the result inside the real engine:

- ``expert_parallel_config`` builds the ``DistributedConfig`` (experts split over ``ep_size`` ranks, dense
  modules FSDP-sharded over the world, each rank with its own batch: the all-to-all token exchange);
- ``load_expert_parallel`` loads a checkpoint (stock, pruned or rebalanced) with it, after checking the
  per-layer counts divide by ``ep_size`` (naming the layers that do not);
- ``RankExpertLoad`` counts, per MoE layer, the (token, expert) pairs that this rank's experts compute,
  by wrapping the experts kernel through transformers' ``ExpertsInterface`` (the EP dispatch calls the
  kernel directly, so module hooks would only see the tokens before the exchange). Without expert
  parallelism it counts every pair, so it is also a plain load meter.

Nothing here moves tokens or weights itself: that stays transformers' job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from hf_moeprune import compat
from hf_moeprune.adapters import get_adapter
from hf_moeprune.surgery import unwrap_model

logger = logging.getLogger(__name__)

COUNTING_IMPLEMENTATION = "hf_moeprune_rank_load"


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def expert_parallel_config(ep_size: int | None = None):
    """``DistributedConfig`` with experts split over ``ep_size`` ranks (default: the world size).

    Dense modules are FSDP-sharded over the whole world (``fsdp_size = world``), so every rank runs its own
    batch and tokens reach their experts by all-to-all. Works on CPU (gloo) as on GPUs (nccl).
    """
    from transformers.distributed import DistributedConfig

    world = _world_size()
    ep_size = world if ep_size is None else ep_size
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 2:
        raise ValueError(f"ep_size={ep_size!r}: expert parallelism needs an integer >= 2")
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the number of processes ({world})")
    return DistributedConfig(fsdp_size=world, ep_size=ep_size)


def check_expert_parallel_counts(counts: Sequence[int | None], ep_size: int) -> None:
    """Raise a ValueError naming every MoE layer whose expert count ``ep_size`` does not divide."""
    bad = {layer: c for layer, c in enumerate(counts) if c is not None and c % ep_size}
    if bad:
        raise ValueError(
            f"ep_size={ep_size} must divide every MoE layer's expert count; layers {sorted(bad)} have "
            f"{[bad[k] for k in sorted(bad)]} experts (prune with balance_ep_size={ep_size} or "
            f"prune_multiple_of={ep_size} to keep counts divisible)"
        )


def load_expert_parallel(path: str, ep_size: int | None = None, **kwargs) -> nn.Module:
    """``from_pretrained(path)`` (with the family's Auto class) under expert parallelism; call it on every rank.

    torch.distributed is initialised by transformers from the launcher's environment (``torchrun``,
    ``accelerate launch``) if it is not already.
    """
    from hf_moeprune.loading import load_config, load_model

    config = load_config(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    distributed_config = expert_parallel_config(ep_size)
    counts = getattr(config, "experts_per_layer", None)
    if counts is not None:
        check_expert_parallel_counts(counts, distributed_config.ep_size)
    else:  # a stock checkpoint: one count for every layer
        adapter = get_adapter(config)
        field, count = adapter.num_experts_field, adapter.num_experts_in_config(config)
        if count % distributed_config.ep_size:
            raise ValueError(
                f"ep_size={distributed_config.ep_size} must divide the expert count, but {path} has {field}={count}"
            )
    return load_model(path, config=config, distributed_config=distributed_config, **kwargs)


def _register_counting_implementation() -> None:
    ALL_EXPERTS_FUNCTIONS = compat.experts_functions()

    if COUNTING_IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS:
        return

    def counted_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        meter = self._moeprune_rank_load
        # ids >= num_experts are the EP sentinels for experts of other ranks (and -1 pads): not computed here
        ids = top_k_index.reshape(-1)
        local = ids[(ids >= 0) & (ids < self.num_experts)]
        meter[0].add(meter[1], torch.bincount(local, minlength=self.num_experts).cpu())
        inner = ALL_EXPERTS_FUNCTIONS.get_interface(meter[2], compat.experts_eager_forward(type(self)))
        return inner(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)

    ALL_EXPERTS_FUNCTIONS.register(COUNTING_IMPLEMENTATION, counted_experts_forward)


class RankExpertLoad:
    """Context manager: (token, expert) pairs computed by this rank's experts, per MoE layer.

    ``counts[layer]`` is a 1-D int64 tensor over the experts this rank holds (all of them without expert
    parallelism). ``gather()`` all-gathers the per-layer totals into a ``[world, layers]`` tensor, identical
    on every rank: row ``r`` is the work rank ``r`` did.

        with RankExpertLoad(model) as load:
            model(input_ids)
        per_rank = load.gather()
    """

    def __init__(self, model: nn.Module):
        self.model = unwrap_model(model)
        self.adapter = get_adapter(self.model)
        self.layers = self.adapter.moe_layer_indices(self.model)
        self.counts: dict[int, torch.Tensor] = {}
        self._saved: list[tuple[object, object]] = []

    def add(self, layer: int, counts: torch.Tensor) -> None:
        self.counts[layer] = counts if layer not in self.counts else self.counts[layer] + counts

    def __enter__(self) -> RankExpertLoad:
        _register_counting_implementation()
        decoder_layers = self.adapter.decoder_layers(self.model)
        configs = {}
        for layer in self.layers:
            experts = self.adapter.experts(decoder_layers[layer])
            config = getattr(experts, "config", None)
            if config is None or compat.experts_eager_forward(type(experts)) is None:
                raise ValueError(
                    f"layer {layer}: {type(experts).__name__} does not dispatch through transformers' "
                    "ExpertsInterface, so its per-rank work cannot be counted"
                )
            configs[id(config)] = config
            experts._moeprune_rank_load = (self, layer, compat.experts_implementation(config))
        for config in configs.values():
            self._saved.append((config, compat.experts_implementation(config)))
            compat.set_experts_implementation_internal(config, COUNTING_IMPLEMENTATION)
        return self

    def __exit__(self, *exc) -> None:
        for config, implementation in self._saved:
            compat.set_experts_implementation_internal(config, implementation)
        self._saved = []
        decoder_layers = self.adapter.decoder_layers(self.model)
        for layer in self.layers:
            experts = self.adapter.experts(decoder_layers[layer])
            experts.__dict__.pop("_moeprune_rank_load", None)

    def totals(self) -> torch.Tensor:
        """Pairs computed on this rank, per MoE layer (in ``self.layers`` order)."""
        return torch.tensor([int(self.counts[i].sum()) if i in self.counts else 0 for i in self.layers])

    def gather(self) -> torch.Tensor:
        """``[world, layers]`` pairs computed by each rank (just ``[1, layers]`` without torch.distributed)."""
        local = self.totals()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return local.unsqueeze(0)
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        local = local.to(device)
        out = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(out, local)
        return torch.stack(out).cpu()
