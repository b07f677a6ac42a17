"""Routing observation: the one place that watches MoE routing and turns it into per-expert statistics.

The trainer, one-shot pruning (``oneshot.py``), load measurement for balancing (``balancing/loads.py``) and the
demo's specialisation report all read the ``ExpertStatistics`` this module fills. Counts come from the indices the
router itself returns (after its family rule: score correction bias, group-limited top-k, a learned selection
bias, soft masks), never from re-ranking logits, so every family is counted as it actually routes.

- Router forward hooks re-route when experts are soft-masked before removal (on top of the router's own
  learned ``selection_bias`` buffer, if the model has one), record token counts and router probability mass,
  and keep the router logits of the current forward for the auxiliary and z losses.
- An instance-level wrapper around each experts module records the REAP statistic (gate weight x ||expert
  output||). It calls the module's own forward (eager, grouped_mm, ...) with one row per (token, expert)
  pair and unit weights, so the per-pair outputs come out at no extra expert compute; the weighted sum is
  then formed exactly as transformers forms it. Experts modules that the block calls densely on score-scaled
  inputs (``adapters.base.EXPERTS_CALLS``, Llama 4) keep their stock call and get the per-pair outputs from one
  more gradient-free call; the router's output is read through the family's ``router_output`` convention.

Recording is switched on only around the training forward (``recording``), so activation-checkpoint
recomputation during backward and evaluation forwards are not counted twice. ``observe_routing`` runs
calibration batches through a model in eval mode with the hooks attached (one-shot, balancing, demo).

The maths (counts per expert, REAP / EAN sums) are pure functions of tensors, testable without a model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_moeprune.adapters import MoEAdapter, get_adapter
from hf_moeprune.distributed import is_sharded
from hf_moeprune.format.modeling_moeprune import SELECTION_BIAS
from hf_moeprune.lora import expert_adapter_saliency, innermost
from hf_moeprune.pruning.statistics import ExpertStatistics
from hf_moeprune.surgery import unwrap_model

logger = logging.getLogger(__name__)

# called as (layer, experts, hidden_states, top_k_index, per_pair_outputs, token_weights); see oneshot.OutputObserver
OutputObserverFn = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


# -- pure maths -------------------------------------------------------------------------------------------------
def pair_weights(
    token_weights: torch.Tensor | None, top_k: int, routed: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Per-(token, expert) pair weights in ``top_k_index.reshape(-1)`` order from per-token weights (None: all 1).
    ``routed`` [tokens, top_k] (bool): False for pairs that went to a router row that is not a routed expert
    (LongCat's zero-computation experts), which then weigh 0."""
    weights = None if token_weights is None else token_weights.repeat_interleave(top_k)
    if routed is None:
        return weights
    mask = routed.reshape(-1).to(torch.float32 if weights is None else weights.dtype)
    return mask if weights is None else weights * mask.to(weights.device)


def routed_counts(
    top_k_index: torch.Tensor,
    num_experts: int,
    token_weights: torch.Tensor | None = None,
    routed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens routed to each expert: ``top_k_index`` [tokens, top_k] as the router chose them, each token counted
    with its weight (0 for padding). Indices >= ``num_experts`` (router rows after the routed experts) and pairs
    ``routed`` marks False count for no expert."""
    beyond = top_k_index >= num_experts
    if bool(beyond.any()):
        routed = ~beyond if routed is None else routed & ~beyond
        top_k_index = top_k_index.masked_fill(beyond, 0)
    weights = pair_weights(token_weights, top_k_index.shape[-1], routed)
    return torch.bincount(top_k_index.reshape(-1), weights=weights, minlength=num_experts)


def output_norm_sums(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    per_pair: torch.Tensor,
    num_experts: int,
    token_weights: torch.Tensor | None = None,
    routed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert: (REAP numerator = sum of gate weight x ||output||, EAN = sum of ||output||) over routed pairs.

    ``per_pair`` [tokens * top_k, hidden] holds each selected expert's own output in ``top_k_index.reshape(-1)``
    order; padding tokens (weight 0) and pairs ``routed`` marks False (LongCat's routes to a zero-computation
    expert, which its MoE block hands the experts as a placeholder index with weight 0) add nothing."""
    output_norms = per_pair.detach().float().norm(dim=-1)
    norms = output_norms * top_k_weights.detach().float().reshape(-1)
    weights = pair_weights(token_weights, top_k_index.shape[-1], routed)
    if weights is not None:
        norms, output_norms = norms * weights, output_norms * weights
    flat_index = top_k_index.reshape(-1)
    reap = torch.bincount(flat_index, weights=norms, minlength=num_experts)
    ean = torch.bincount(flat_index, weights=output_norms, minlength=num_experts)
    return reap, ean


class RoutingInstrumentation:
    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        statistics: ExpertStatistics,
        record_reap: bool = True,
        reap_in_eval: bool = False,
    ):
        self.model = model
        # REAP needs each expert's own output; without it the experts keep their stock (cheaper) path
        self.record_reap = record_reap
        # one-shot calibration runs in eval() mode (no router jitter, no dropout) and still needs REAP
        self.reap_in_eval = reap_in_eval
        # optional per-expert observers of the per-pair outputs (one-shot: EAN, maximum activations, merging),
        # called as (layer, experts, hidden_states, top_k_index, per_pair_outputs, token_weights)
        self.output_observers: list[OutputObserverFn] = []
        self.adapter = adapter
        self.statistics = statistics
        self.recording = False
        self.reap_active = True  # REAP recorded in this optimizer step (prune_reap_interval samples steps)
        self.capture_logits = False
        self.token_mask: torch.Tensor | None = None
        self.router_logits: dict[int, torch.Tensor] = {}
        self.step_loads: dict[int, torch.Tensor] = {}  # tokens per expert in the current optimizer step
        self.masked: dict[int, torch.Tensor] = {}  # bool [experts]: soft-masked (never selected)
        # bool [tokens, top_k] per layer, this forward: the router chose a routed expert, not an extra row (LongCat's
        # zero-computation experts reach the experts module as placeholder indices, told apart only here)
        self.routed_pairs: dict[int, torch.Tensor] = {}
        self._handles = []
        self._wrapped: list[nn.Module] = []
        # layer -> (router input, top-k weights, top-k indices) of the current forward, for EXPERTS_CALLS other
        # than "routed"
        self._routes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        layers = self.adapter.decoder_layers(self.model)
        for idx in self.adapter.moe_layer_indices(self.model):
            router = self.adapter.router(layers[idx])
            experts = self.adapter.experts(layers[idx])
            self._handles.append(router.register_forward_hook(self._router_hook(idx)))
            if self.record_reap:
                wrap = EXPERTS_FORWARD_WRAPPERS[self.adapter.experts_call]
                experts.forward = wrap(self, idx, experts, experts.forward)
                self._wrapped.append(experts)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for experts in self._wrapped:
            del experts.forward  # back to the class's forward
        self._handles, self._wrapped, self._routes = [], [], {}

    def select(self, layer: int, index: torch.Tensor) -> None:
        """Follow expert surgery in one layer."""
        for store in (self.masked, self.step_loads):
            if layer in store:
                store[layer] = store[layer].index_select(0, index.to(store[layer].device))

    # -- helpers -----------------------------------------------------------------------------
    def _token_weights(self, num_tokens: int, device) -> torch.Tensor | None:
        mask = self.token_mask
        if mask is None or mask.numel() != num_tokens:
            return None
        return mask.reshape(-1).to(device=device, dtype=torch.float32)

    def _mask_bias(self, layer: int, router: nn.Module, logits: torch.Tensor) -> torch.Tensor | None:
        """-inf for soft-masked experts, plus the router's learned selection bias (whose own hook has already
        routed the unmasked case); None when nothing is masked."""
        masked = self.masked.get(layer)
        if masked is None or not bool(masked.any()):
            return None
        bias = torch.zeros(masked.shape, dtype=torch.float32, device=logits.device)
        bias[masked.to(logits.device)] = float("-inf")
        learned = getattr(router, SELECTION_BIAS, None)
        return bias if learned is None else bias + learned.to(logits.device)

    def _router_hook(self, layer: int):
        def hook(module, args, output):
            logits, weights, indices = self.adapter.unpack_router_output(module, output)
            bias = self._mask_bias(layer, module, logits)
            if bias is not None:
                output = self.adapter.reroute(module, args, output, bias)
                logits, weights, indices = self.adapter.unpack_router_output(module, output)
            if self.record_reap and self.adapter.experts_call != "routed":
                # an experts module called without the choice (Llama 4) reads it here: the block calls the router
                # right before its experts, also when activation checkpointing recomputes the forward
                self._routes[layer] = (args[0], weights, indices)
            if self.capture_logits:
                self.router_logits[layer] = logits
            num_experts = logits.shape[-1]
            if self.adapter.extra_rows_field is not None:
                num_experts = self._num_experts(layer)
                self.routed_pairs[layer] = indices.detach() < num_experts
            if self.recording:
                with torch.no_grad():
                    token_weights = self._token_weights(logits.shape[0], logits.device)
                    # the routed experts' share of the router's scores (not the extra rows')
                    probs = self.adapter.scores(logits.detach())[..., :num_experts]
                    if token_weights is not None:
                        probs = probs * token_weights[:, None]
                    counts = routed_counts(indices, num_experts, token_weights)
                    self.statistics.add(layer, "tokens", counts)
                    self.statistics.add(layer, "prob_mass", probs.sum(0))
                    previous = self.step_loads.get(layer)
                    counts = counts.float().cpu()
                    self.step_loads[layer] = counts if previous is None else previous + counts
            return output

        return hook

    def _num_experts(self, layer: int) -> int:
        # the router's rows: the layer's global count (under expert parallelism experts.num_experts is the local one)
        return self.adapter.num_experts(self.adapter.decoder_layers(self.model)[layer])

    def _record_outputs(self, layer, experts, hidden_states, top_k_index, top_k_weights, per_pair) -> None:
        """Add one forward's REAP / EAN sums and feed the output observers (``per_pair`` in
        ``top_k_index.reshape(-1)`` order). Pairs the router sent to extra rows (LongCat's zero-computation experts,
        `routed_pairs`) are no routed expert's output and are left out."""
        with torch.no_grad():
            token_weights = self._token_weights(top_k_index.shape[0], per_pair.device)
            num_experts = self._num_experts(layer)
            routed = self.routed_pairs.pop(layer, None)
            if routed is not None and routed.shape != top_k_index.shape:
                raise RuntimeError(
                    f"layer {layer}: the router chose {tuple(routed.shape)} (token, slot) pairs but the experts "
                    f"received {tuple(top_k_index.shape)}; cannot tell routed experts from extra router rows"
                )
            reap, ean = output_norm_sums(top_k_index, top_k_weights, per_pair, num_experts, token_weights, routed)
            self.statistics.add(layer, "reap_sum", reap)
            self.statistics.add(layer, "ean_sum", ean)
            self.statistics.add(layer, "reap_tokens", routed_counts(top_k_index, num_experts, token_weights, routed))
            observed = per_pair.detach()
            if routed is not None:  # placeholder pairs of extra rows: no output of the expert they name
                observed = observed * routed.reshape(-1, 1).to(observed.dtype)
            for observe in self.output_observers:
                observe(layer, experts, hidden_states, top_k_index, observed, token_weights)

    def _dense_experts_forward(self, layer: int, experts: nn.Module, original_forward):
        """EXPERTS_CALLS["dense_scaled_inputs"] (Llama 4): the block calls ``experts(routed_in)`` with every token
        once per expert, its input multiplied by that expert's score. The stock call runs unchanged; when REAP is
        recorded, one more gradient-free call on the same layout with score 1 for the chosen experts (0 elsewhere;
        an expert without biases maps 0 to 0) gives each routed pair's own output f(x), weighted by its score as in
        every family (REAP = score x ||f(x)||; Llama 4 adds f(score * x), which only equals score * f(x) for a
        linear expert)."""

        def forward(routed_in, *args, **kwargs):
            out = original_forward(routed_in, *args, **kwargs)
            route = self._routes.pop(layer, None)
            if not (experts.training or self.reap_in_eval) or not self.reap_active or not self.recording:
                return out
            if route is None:
                raise RuntimeError(f"layer {layer}: the experts ran without their router's forward hook seeing it")
            hidden_states, top_k_weights, top_k_index = route
            hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
            num_tokens = top_k_index.shape[0]
            num_experts = routed_in.shape[0] // num_tokens
            with torch.no_grad():
                chosen = torch.zeros(num_tokens, num_experts, dtype=routed_in.dtype, device=routed_in.device)
                chosen.scatter_(1, top_k_index, 1.0)
                unit_in = hidden_states.repeat(num_experts, 1) * chosen.transpose(0, 1).reshape(-1, 1)
                own = original_forward(unit_in, *args, **kwargs).view(num_experts, num_tokens, -1)
                tokens = torch.arange(num_tokens, device=own.device).repeat_interleave(top_k_index.shape[1])
                per_pair = own[top_k_index.reshape(-1), tokens]
            self._record_outputs(layer, experts, hidden_states, top_k_index, top_k_weights, per_pair)
            return out

        return forward

    def _experts_forward(self, layer: int, experts: nn.Module, original_forward):
        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            # The path depends on the module's mode, not on `recording`: activation checkpointing recomputes
            # the forward during backward (recording off) and must see the same operations.
            # reap_active only changes between optimizer steps, so a recomputation sees the same path too
            if not (experts.training or self.reap_in_eval) or not self.reap_active:
                return original_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            num_tokens, top_k = top_k_index.shape
            pairs = hidden_states.repeat_interleave(top_k, dim=0)
            unit = torch.ones(num_tokens * top_k, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
            per_pair = original_forward(pairs, top_k_index.reshape(-1, 1), unit, *args, **kwargs)
            combined = (per_pair.view(num_tokens, top_k, -1) * top_k_weights.unsqueeze(-1)).sum(dim=1)
            if self.recording:
                self._record_outputs(layer, experts, hidden_states, top_k_index, top_k_weights, per_pair)
            return combined.to(hidden_states.dtype)

        return forward

    # -- training-time quantities ------------------------------------------------------------
    def accumulate_saliency(self) -> None:
        """Add |theta . grad| per expert (first-order Taylor) from the current gradients."""
        layers = self.adapter.decoder_layers(self.model)
        for idx in self.statistics.layers:
            wrapped = self.adapter.experts(layers[idx])
            experts = innermost(wrapped)  # the experts module inside any peft LoRA wrappers
            # frozen experts (LoRA): the per-expert LoRA factors' own theta . grad
            dot = expert_adapter_saliency(wrapped, experts.num_experts)
            for param in experts.parameters(recurse=False):
                if param.grad is None or param.dim() == 0 or param.shape[0] != self._num_experts(idx):
                    continue
                contribution = (param.detach().float() * param.grad.detach().float()).flatten(1).sum(1)
                if is_sharded(contribution):  # FSDP2 / expert parallelism: every rank takes the whole layer's
                    contribution = contribution.full_tensor()  # sums, as DDP's all-reduced gradients give them
                dot = contribution if dot is None else dot + contribution
            if dot is not None:
                self.statistics.add(idx, "saliency", dot.abs())

    def take_router_logits(self) -> dict[int, torch.Tensor]:
        logits, self.router_logits = self.router_logits, {}
        return logits


# EXPERTS_CALLS name -> how the instrumentation wraps such an experts module's forward: (instrumentation, layer,
# experts, original forward) -> forward
EXPERTS_FORWARD_WRAPPERS: dict[str, Callable] = {
    "routed": RoutingInstrumentation._experts_forward,
    "dense_scaled_inputs": RoutingInstrumentation._dense_experts_forward,
}


# -- observing calibration data ---------------------------------------------------------------------------------
def new_statistics(model: nn.Module, adapter: MoEAdapter, window: int = 0, decay: float = 1.0) -> ExpertStatistics:
    """Empty statistics for every MoE layer of ``model`` (each layer's current expert count)."""
    layers = adapter.decoder_layers(model)
    experts = {i: adapter.num_experts(layers[i]) for i in adapter.moe_layer_indices(model)}
    return ExpertStatistics(experts, window=window, decay=decay)


def attach_observer(
    model: nn.Module,
    adapter: MoEAdapter,
    statistics: ExpertStatistics,
    record_reap: bool = True,
    observers: Sequence[OutputObserverFn] = (),
) -> RoutingInstrumentation:
    """Hooks for calibration in eval mode (no router jitter, no dropout), attached; ``detach()`` when done."""
    inst = RoutingInstrumentation(model, adapter, statistics, record_reap=record_reap, reap_in_eval=True)
    inst.output_observers.extend(observers)
    inst.attach()
    return inst


def observe_routing(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    record_reap: bool = True,
    saliency: bool = False,
    observers: Sequence[OutputObserverFn] = (),
    forward_kwargs: Mapping | None = None,
    on_output: Callable[[Mapping[str, torch.Tensor], object], None] | None = None,
    progress: bool = True,
    desc: str = "collecting expert statistics",
) -> ExpertStatistics:
    """Run ``batches`` (``input_ids`` and optionally ``attention_mask``; padding is not counted) through ``model``
    in eval mode and return the routing statistics summed over them, as one closed step.

    ``saliency`` also back-propagates the causal-LM loss for |theta . grad|; ``on_output(batch, output)`` sees
    each forward's output (the demo takes its held-out loss from it); ``forward_kwargs`` go to every forward.
    """
    model = unwrap_model(model)
    adapter = get_adapter(model)
    statistics = new_statistics(model, adapter)
    inst = attach_observer(model, adapter, statistics, record_reap=record_reap, observers=observers)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            inst.token_mask = batch.get("attention_mask")
            inst.recording = True
            with torch.set_grad_enabled(saliency):
                out = model(**batch, labels=batch["input_ids"] if saliency else None, **(forward_kwargs or {}))
            inst.recording = False
            if on_output is not None:
                on_output(batch, out)
            if saliency:
                out.loss.backward()
                inst.accumulate_saliency()
                model.zero_grad(set_to_none=True)
    finally:
        inst.detach()
        model.train(was_training)
    statistics.end_step()
    return statistics
