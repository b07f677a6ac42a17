"""Carry optimizer state across expert surgery: slice the moments with the parameters, never reset them."""

from __future__ import annotations

import torch

from hf_moeprune.distributed import is_sharded, reshard_like, select_rows


class OptimizerStateSlicer:
    """``on_tensor_replaced`` hook for ``prune_experts``/``permute_experts``.

    Replaces the old parameter by the new one in every param group (same position, so group settings and
    the LR schedule carry on) and moves its state, slicing each per-expert tensor (AdamW ``exp_avg``,
    ``exp_avg_sq``, ...) with the same index along ``dim`` (1 for LoRA factors whose experts are columns).
    Scalars such as AdamW's ``step`` are kept as they are.
    """

    def __init__(self, optimizer):
        # accelerate wraps the torch optimizer; param groups and state live on the inner one
        self.optimizer = getattr(optimizer, "optimizer", optimizer) if optimizer is not None else None

    def __call__(self, old: torch.Tensor, new: torch.Tensor, index: torch.Tensor, dim: int = 0) -> None:
        if self.optimizer is None or not isinstance(old, torch.nn.Parameter):
            return
        for group in self.optimizer.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                if p is old:
                    params[i] = new
        state = self.optimizer.state.pop(old, None)
        if state is None:
            return
        self.optimizer.state[new] = {key: self._follow(value, old, new, index, dim) for key, value in state.items()}

    @staticmethod
    def _follow(value, old: torch.Tensor, new: torch.Tensor, index: torch.Tensor, dim: int):
        if not (torch.is_tensor(value) and value.dim() > dim and value.shape[dim] == old.shape[dim]):
            return value
        if is_sharded(value):
            # FSDP2 / expert parallelism: the moments are sharded like the parameter (experts on dim 0); gather
            # this one tensor, keep its rows, and shard it exactly as the new parameter is sharded
            return reshard_like(select_rows(value, index), new)
        return value.index_select(dim, index.to(value.device))
