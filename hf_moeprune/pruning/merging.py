"""Expert merging as an alternative to removal (the HC-SMoE / M-SMoE family of REAP baselines).

Each removed expert is folded into the kept expert whose outputs on the calibration set are most similar (cosine
similarity of the experts' mean outputs over *all* calibration tokens, as HC-SMoE compares experts), and every
kept expert becomes the frequency-weighted average of itself and the experts folded into it:
``W_k' = sum_i f_i W_i / sum_i f_i`` over the group, computed as ``W_k + sum_r (f_r / F) (W_r - W_k)`` so that a
group of identical experts leaves ``W_k`` bit for bit unchanged. The router keeps the kept expert's row (M-SMoE
keeps the dominant expert's router). Pure functions on tensors; ``merge_experts`` applies them to a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def merge_assignment(output_sum: torch.Tensor, keep: Sequence[int]) -> dict[int, int]:
    """Removed expert -> the kept expert with the most similar mean output (cosine; ties to the lower index).

    ``output_sum`` is ``[experts, hidden]``: each expert's output summed over the same calibration tokens."""
    num_experts = output_sum.shape[0]
    kept = [int(k) for k in keep]
    removed = [e for e in range(num_experts) if e not in set(kept)]
    if not removed:
        return {}
    vectors = torch.nn.functional.normalize(output_sum.double(), dim=-1)
    similarity = vectors[removed] @ vectors[kept].T  # [removed, kept]
    best = similarity.argmax(dim=-1)
    return {r: kept[int(b)] for r, b in zip(removed, best)}


def merged_rows(tensor: torch.Tensor, assignment: Mapping[int, int], frequency: torch.Tensor) -> torch.Tensor:
    """``tensor`` ([experts, ...]) with each kept expert's row replaced by the frequency-weighted average of its
    group (itself and the experts assigned to it). Rows of removed experts are left as they are (surgery drops
    them). A group whose experts received no tokens keeps the kept expert's row."""
    out = tensor.detach().clone()
    groups: dict[int, list[int]] = {}
    for removed, kept in assignment.items():
        groups.setdefault(int(kept), []).append(int(removed))
    freq = frequency.double().cpu()
    for kept, members in groups.items():
        total = float(freq[kept] + freq[members].sum())
        if total <= 0:
            continue
        base = tensor[kept].float()
        delta = torch.zeros_like(base)
        for r in members:
            delta += (float(freq[r]) / total) * (tensor[r].float() - base)
        out[kept] = (base + delta).to(tensor.dtype)
    return out


def merge_experts(
    model: nn.Module,
    assignments: Mapping[int, Mapping[int, int]],
    frequencies: Mapping[int, torch.Tensor],
    optimizer=None,
) -> None:
    """Fold removed experts into kept ones in place (expert weights and biases; router rows untouched); apply
    ``prune_experts`` with the kept positions afterwards to remove the folded experts.

    With ``optimizer`` (torch or accelerate-wrapped, during training), the per-expert optimizer state of those
    tensors (AdamW's ``exp_avg`` and ``exp_avg_sq``: any state tensor shaped like the parameter) is folded with
    the same weights, so a merged expert carries on with the averaged moments of its group rather than with its
    own moments next to averaged weights (a group of identical experts leaves them bit for bit unchanged)."""
    from hf_moeprune.adapters import get_adapter
    from hf_moeprune.format.modeling_moeprune import get_submodule_attr
    from hf_moeprune.surgery import unwrap_model

    model = unwrap_model(model)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    optimizer_state = getattr(optimizer, "optimizer", optimizer).state if optimizer is not None else {}
    for layer, assignment in assignments.items():
        if not assignment:
            continue
        experts = adapter.experts(layers[int(layer)])
        for name in adapter.expert_tensors:
            try:
                owner, attr = get_submodule_attr(experts, name)
            except AttributeError:
                continue
            value = getattr(owner, attr, None)
            if isinstance(value, torch.Tensor):
                with torch.no_grad():
                    value.copy_(merged_rows(value, assignment, frequencies[int(layer)]))
                    for moment in optimizer_state.get(value, {}).values():
                        if torch.is_tensor(moment) and moment.shape == value.shape:
                            moment.copy_(merged_rows(moment, assignment, frequencies[int(layer)]))


def weight_similarity(model: nn.Module, layer: int) -> torch.Tensor:
    """``[experts, features]``: each expert's weights flattened, for merging when no calibration outputs exist
    (at the trainer's removal events); cosine similarity of these rows compares experts by their parameters."""
    from hf_moeprune.adapters import get_adapter
    from hf_moeprune.format.modeling_moeprune import get_submodule_attr

    adapter = get_adapter(model)
    experts = adapter.experts(adapter.decoder_layers(model)[layer])
    parts = []
    for name in adapter.expert_tensors:
        try:
            owner, attr = get_submodule_attr(experts, name)
        except AttributeError:
            continue
        value = getattr(owner, attr, None)
        if isinstance(value, torch.Tensor):
            parts.append(value.detach().float().flatten(1))
    return torch.cat(parts, dim=1)


def merge_before_removal(
    model: nn.Module,
    keep: Mapping[int, Sequence[int]],
    frequencies: Mapping[int, torch.Tensor],
    output_sum: Mapping[int, torch.Tensor] | None = None,
    optimizer=None,
) -> dict[int, dict[int, int]]:
    """Fold the experts ``keep`` drops into kept ones (by calibration outputs when given, else by weights), in place,
    with their ``optimizer`` state when given (see ``merge_experts``); returns the assignments.
    ``prune_experts(model, keep)`` then removes the folded experts."""
    from hf_moeprune.surgery import unwrap_model

    model = unwrap_model(model)
    assignments = {}
    for layer, kept in keep.items():
        vectors = output_sum[layer] if output_sum is not None else weight_similarity(model, int(layer))
        assignments[int(layer)] = merge_assignment(vectors, kept)
    merge_experts(model, assignments, frequencies, optimizer)
    return assignments
