"""Post-hoc (one-shot) expert pruning: measure statistics on calibration data, score, allocate, remove.

The same statistics, criteria and allocation as ``MoEPruneTrainer``, without training: REAP one-shot
(arXiv 2510.13999) is ``prune_oneshot(model, batches, criterion="reap")``, frequency pruning
``criterion="frequency"``, EAN ``criterion="ean"``. Saliency needs gradients and is computed from the causal-LM
loss. Calibration runs in ``eval()`` mode, so router jitter and dropout do not change the scores.

For checkpoints bigger than memory, ``collect_statistics_layerwise`` runs the calibration batches through one
decoder layer at a time, loading that layer from the safetensors checkpoint (onto the GPU when there is one) and
keeping only the hidden states (and the masks/position embeddings the layers take) between layers. Its
statistics equal ``collect_statistics`` on the loaded model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_moeprune import compat
from hf_moeprune.adapters import get_adapter
from hf_moeprune.adapters.discovery import experts_call_convention
from hf_moeprune.observation import attach_observer, new_statistics, observe_routing
from hf_moeprune.pruning.allocation import AllocationSpec, allocate, select_experts
from hf_moeprune.pruning.budgets import layer_budgets
from hf_moeprune.pruning.criteria import get_criterion
from hf_moeprune.pruning.statistics import STAT_NAMES, LayerStats
from hf_moeprune.surgery import prune_experts, unwrap_model

logger = logging.getLogger(__name__)

STATISTICS_FILE = "expert_statistics.safetensors"
STATISTICS_META = "expert_statistics.json"


class OutputObserver:
    """Per-expert quantities of the experts' outputs beyond ``ExpertStatistics`` (which holds only sums that add
    across processes). Subclasses fill ``self.values[name][layer]``; called by the experts wrapper of the routing
    observer (``hf_moeprune.observation``) with the per-(token, expert) outputs."""

    def __init__(self):
        self.values: dict[str, dict[int, torch.Tensor]] = {}

    def __call__(self, layer, experts, hidden_states, top_k_index, per_pair, token_weights) -> None:
        raise NotImplementedError


class MaxActivationObserver(OutputObserver):
    """The largest |activation| each expert emitted on the calibration tokens routed to it (Super Experts,
    Su et al. 2025: a few experts produce the massive activations a model depends on)."""

    def __call__(self, layer, experts, hidden_states, top_k_index, per_pair, token_weights) -> None:
        peaks = per_pair.float().abs().amax(dim=-1)
        if token_weights is not None:
            peaks = peaks * (token_weights.repeat_interleave(top_k_index.shape[-1]) > 0)
        store = self.values.setdefault("max_activation", {})
        current = store.get(layer)
        if current is None:
            current = torch.zeros(experts.num_experts, dtype=torch.float32, device=peaks.device)
        store[layer] = current.scatter_reduce(0, top_k_index.reshape(-1), peaks, reduce="amax")


def _every_expert_routed(experts: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    num_experts, n = experts.num_experts, hidden.shape[0]
    pairs = hidden.repeat_interleave(num_experts, dim=0)
    index = torch.arange(num_experts, device=hidden.device).repeat(n).unsqueeze(-1)
    unit = torch.ones(n * num_experts, 1, dtype=hidden.dtype, device=hidden.device)
    return type(experts).forward(experts, pairs, index, unit).view(n, num_experts, -1)


def _every_expert_dense(experts: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # every token once per expert with score 1: the block's own layout (experts-major), transposed to tokens-major
    num_experts, n = experts.num_experts, hidden.shape[0]
    return type(experts).forward(experts, hidden.repeat(num_experts, 1)).view(num_experts, n, -1).transpose(0, 1)


# adapters.base.EXPERTS_CALLS name -> (experts module, hidden [tokens, hidden]) -> every expert's output on every token
# [tokens, experts, hidden], through the class's own forward (not the statistics wrapper)
EVERY_EXPERT_OUTPUTS = {"routed": _every_expert_routed, "dense_scaled_inputs": _every_expert_dense}


class ExpertOutputObserver(OutputObserver):
    """Each expert's output summed over *all* calibration tokens (every expert applied to every token, as HC-SMoE
    compares experts), for merging removed experts into the kept expert whose outputs are most similar."""

    def __init__(self, chunk_tokens: int = 256):
        super().__init__()
        self.chunk_tokens = chunk_tokens

    def __call__(self, layer, experts, hidden_states, top_k_index, per_pair, token_weights) -> None:
        every_expert = EVERY_EXPERT_OUTPUTS[experts_call_convention(experts)]
        total = None
        for start in range(0, hidden_states.shape[0], self.chunk_tokens):
            chunk = hidden_states[start : start + self.chunk_tokens]
            n = chunk.shape[0]
            out = every_expert(experts, chunk).float()
            if token_weights is not None:
                out = out * token_weights[start : start + n].view(n, 1, 1)
            part = out.sum(0)
            total = part if total is None else total + part
        store = self.values.setdefault("output_sum", {})
        store[layer] = total if layer not in store else store[layer] + total


def collect_statistics(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    saliency: bool = False,
    progress: bool = True,
    observers: Sequence[OutputObserver] = (),
) -> dict[int, LayerStats]:
    """Expert statistics (tokens, probability mass, REAP, EAN, optionally saliency) summed over ``batches``, with
    the model in eval mode (no router jitter, no dropout)."""
    stats = observe_routing(model, batches, saliency=saliency, observers=observers, progress=progress)
    return stats.snapshot()


# -- layer-wise calibration ------------------------------------------------------------------------------------
class _StopForward(Exception):
    pass


def _capture_layer_inputs(model: nn.Module, adapter, batch: dict[str, torch.Tensor]):
    """Run the embeddings and the model's own mask/position set-up on ``batch`` with every decoder layer replaced by
    a pass-through that records its arguments. Returns (layer-0 hidden states, per-layer keyword arguments)."""
    layers = adapter.decoder_layers(model)
    captured: list[dict] = [None] * len(layers)
    first_hidden = []

    def catcher(index):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise RuntimeError(f"decoder layer {index} was called with positional arguments beyond hidden_states")
            if index == 0:
                first_hidden.append(hidden_states)
            captured[index] = kwargs
            if index == len(layers) - 1:
                raise _StopForward
            return hidden_states

        return forward

    for i, layer in enumerate(layers):
        layer.forward = catcher(i)
    try:
        base = getattr(model, model.base_model_prefix, None)
        if base is None:  # Llama 4's causal LM declares the prefix "language_model" but keeps its backbone in .model
            base = getattr(model, "model", model)
        base(**batch, use_cache=False)
    except _StopForward:
        pass
    finally:
        for layer in layers:
            del layer.forward
    return first_hidden[0], captured


def _buffers_to(model: nn.Module, device) -> None:
    for module in model.modules():
        for name, buf in compat.own_buffers(module).items():
            if buf is not None and not buf.is_meta:
                compat.set_buffer(module, name, buf.to(device))


def collect_statistics_layerwise(
    path: str | os.PathLike,
    batches: Sequence[dict[str, torch.Tensor]],
    device: str | torch.device | None = None,
    progress: bool = True,
    observers: Sequence[OutputObserver] = (),
) -> tuple[nn.Module, dict[int, LayerStats]]:
    """The statistics of ``collect_statistics`` for the checkpoint at ``path`` (a local safetensors folder), with
    only one decoder layer in memory at a time. Returns the meta-device skeleton (for planning) and the statistics.

    Memory: the embeddings, one decoder layer, and the hidden states of all calibration batches (plus their masks
    and position embeddings). ``device`` defaults to CUDA when available.
    """
    from hf_moeprune.streaming import ModuleLoader, materialize, meta_skeleton, release, return_freed_memory

    return_freed_memory()  # before the first layer: pins glibc's mmap threshold (see its docstring)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = meta_skeleton(path, include_buffers=True)
    adapter = get_adapter(model)
    loader = ModuleLoader.create(path, model)
    _buffers_to(model, device)
    # the LM head is not needed for routing statistics (unless it is tied to the input embeddings)
    head = {id(p) for p in model.get_output_embeddings().parameters()} if model.get_output_embeddings() else set()
    head -= {id(p) for p in model.get_input_embeddings().parameters()}
    head_names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in head}
    outside = {n: t for n, t in loader.load_module_state(None).items() if n not in head_names}
    materialize(model, outside, device)
    del outside
    batches = [{k: v.to(device) for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in batches]
    hidden, layer_kwargs = [], []
    with torch.no_grad():
        for batch in batches:
            h, kwargs = _capture_layer_inputs(model, adapter, batch)
            hidden.append(h)
            layer_kwargs.append(kwargs)
    # the embeddings are no longer needed; keep the final norm etc. as they are (small)
    release(model.get_input_embeddings())
    return_freed_memory()
    stats = new_statistics(model, adapter)
    inst = attach_observer(model, adapter, stats, observers=observers)
    layers = adapter.decoder_layers(model)
    try:
        for i in tqdm(range(len(layers)), desc="layer-wise expert statistics", disable=not progress):
            materialize(model, loader.load_module_state(i), device)
            inst.recording = True
            with torch.no_grad():
                for b, batch in enumerate(batches):
                    inst.token_mask = batch.get("attention_mask")
                    out = layers[i](hidden[b], **layer_kwargs[b][i])
                    hidden[b] = out[0] if isinstance(out, tuple) else out
            inst.recording = False
            release(layers[i])
            return_freed_memory()  # so the next layer reuses this one's memory instead of adding to it
    finally:
        inst.detach()
    stats.end_step()
    return model, stats.snapshot()


# -- planning ----------------------------------------------------------------------------------------------------
def super_experts(max_activation: dict[int, torch.Tensor], quantile: float = 0.995, ratio: float = 0.1):
    """Experts whose largest activation is an outlier of the whole model: above the ``quantile`` of all experts'
    maxima and at least ``ratio`` x the largest (the Super Experts rule, Su et al. 2025). Returns layer -> bool
    mask over that layer's experts."""
    if not 0.0 < quantile < 1.0 or not 0.0 < ratio <= 1.0:
        raise ValueError(f"quantile={quantile} must be in (0, 1) and ratio={ratio} in (0, 1]")
    everything = torch.cat([v.double().flatten().cpu() for v in max_activation.values()])
    threshold = max(float(torch.quantile(everything, quantile)), ratio * float(everything.max()))
    return {layer: v.double().cpu() >= threshold for layer, v in max_activation.items()}


def plan_oneshot(
    model: nn.Module,
    stats: dict[int, LayerStats],
    criterion: str,
    target: float,
    allocation: str = "uniform",
    min_experts: int | None = None,
    multiple_of: int = 1,
    scores: dict[int, torch.Tensor] | None = None,
    protect: dict[int, torch.Tensor] | None = None,
) -> dict[int, list[int]]:
    """Positions to keep per layer so that ``target`` of all routed experts go (``scores`` overrides the
    criterion, e.g. random scores for a baseline; ``protect`` masks experts that are never removed, e.g.
    ``super_experts(...)``, as long as the layer keeps at least that many)."""
    model = unwrap_model(model)
    adapter = get_adapter(model)
    budgets = {
        layer: b for layer, b in layer_budgets(model, adapter, min_experts, multiple_of).items() if layer in stats
    }
    if scores is None:
        scores = {layer: get_criterion(criterion)(s) for layer, s in stats.items()}
    loads = {layer: s.tokens for layer, s in stats.items()}
    counts = allocate(budgets, target, AllocationSpec(allocation), scores, loads)
    if protect:
        # protected experts outrank every other; among themselves they keep the criterion's order
        scores = {
            layer: torch.where(protect[layer].to(s.device), s.double() + s.double().abs().max() * 2 + 1, s.double())
            if layer in protect
            else s
            for layer, s in scores.items()
        }
    return {
        layer: select_experts(scores[layer], count, budgets[layer].groups)
        for layer, count in counts.items()
        if count < budgets[layer].current
    }


def prune_oneshot(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    criterion: str = "reap",
    target: float = 0.5,
    allocation: str = "uniform",
    **kwargs,
) -> dict[int, list[int]]:
    """Collect statistics on ``batches``, then remove ``target`` of the routed experts; returns the plan applied."""
    stats = collect_statistics(model, batches, saliency=criterion == "saliency")
    plan = plan_oneshot(model, stats, criterion, target, allocation, **kwargs)
    if plan:
        prune_experts(model, plan)
    logger.info(
        "one-shot %s pruning: experts per layer %s", criterion, getattr(model.config, "experts_per_layer", None)
    )
    return plan


# -- saved statistics --------------------------------------------------------------------------------------------
def save_statistics(
    folder: str | os.PathLike,
    stats: dict[int, LayerStats],
    observers: Sequence[OutputObserver] = (),
    metadata: dict | None = None,
) -> None:
    """Write ``stats`` (and the observers' per-expert values) to ``folder`` as safetensors + a JSON description, so
    several targets/criteria reuse one calibration pass. The folder appears only when complete."""
    from safetensors.torch import save_file

    from hf_moeprune.utils import atomic_output_dir

    tensors = {}
    for layer, s in stats.items():
        for name in STAT_NAMES:
            value = getattr(s, name)
            if value is not None:
                tensors[f"layers.{layer}.{name}"] = value.detach().cpu().contiguous()
    for observer in observers:
        for name, per_layer in observer.values.items():
            for layer, value in per_layer.items():
                tensors[f"layers.{layer}.{name}"] = value.detach().cpu().contiguous()
    with atomic_output_dir(folder) as tmp:
        save_file(tensors, tmp / STATISTICS_FILE)
        description = {"layers": sorted(stats), "format": 1, **(metadata or {})}
        (tmp / STATISTICS_META).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def load_statistics(
    folder: str | os.PathLike,
) -> tuple[dict[int, LayerStats], dict[str, dict[int, torch.Tensor]], dict]:
    """Read what ``save_statistics`` wrote: (statistics per layer, extra per-expert values by name, metadata)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / STATISTICS_FILE).is_file() or not (folder / STATISTICS_META).is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} holds no {STATISTICS_FILE} + {STATISTICS_META} (write them with --stats_out)"
        )
    metadata = json.loads((folder / STATISTICS_META).read_text())
    tensors = load_file(folder / STATISTICS_FILE)
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, layer, name = key.split(".", 2)
        per_layer.setdefault(int(layer), {})[name] = value
    stats, extra = {}, {}
    for layer, values in per_layer.items():
        missing = [n for n in ("tokens", "prob_mass", "reap_sum", "saliency") if n not in values]
        if missing:
            raise ValueError(f"{folder / STATISTICS_FILE}: layer {layer} lacks {missing}")
        stats[layer] = LayerStats(**{n: values.pop(n) for n in STAT_NAMES if n in values})
        for name, value in values.items():
            extra.setdefault(name, {})[layer] = value
    return stats, extra, metadata
