# Pruned-model format for hf_moeprune: configs and causal-LM classes whose MoE layers keep different
# numbers of experts.
#
# This file is deliberately self-contained (it imports only torch and transformers): `save_pretrained`
# copies it next to the weights and writes an `auto_map`, so that
# `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works on a machine where
# hf_moeprune is not installed. Everything here is driven by fields of the saved config
# (`experts_per_layer`, `expert_tensor_names`, `expert_count_attributes`) and by the names of the stock
# classes, so the file carries no per-family table: `MoEPrune<StockClass>` is created on first access (the
# module's `__getattr__`), which is how remote code resolves the `auto_map`. Per-family knowledge that a
# loaded model needs at run time is limited to the routing rules below (every rule a registered family uses
# must be defined here; hf_moeprune checks that at import).
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

logger = logging.getLogger(__name__)

MODEL_TYPE_PREFIX = "moeprune_"
CLASS_PREFIX = "MoEPrune"

# Config fields that make a config "pruned". They are plain JSON values so that the stock export can
# keep them as provenance metadata.
PRUNING_FIELDS = (
    "base_model_type",
    "experts_per_layer",
    "kept_expert_ids",
    "original_num_experts",
    "expert_tensor_names",
    "expert_count_attributes",
)
# Written since hf_moeprune covers families whose counts are not under `num_experts`-like names; checkpoints
# saved before then lack them and fall back to the defaults in `_count_field` / `_top_k`.
OPTIONAL_PRUNING_FIELDS = ("expert_count_field", "expert_top_k_field")
# Written for composite (vision-language) configs only: the sub-config holding the language model's MoE fields
# (``text_config``) and the path from the model to its MoE decoder layers. Absent: the config itself and
# ``model.layers``.
COMPOSITE_PRUNING_FIELDS = ("expert_config_path", "expert_layers_path")
# Written for families whose routers score rows after the routed experts (LongCat-Flash's zero-computation experts,
# Inkling's shared experts): the config field counting those rows, the per-expert tensors (relative to the decoder
# layer) that hold them after the routed rows, and the module attributes caching routed + extra rows. Pruning keeps
# those rows at the end, in order; the family's own index arithmetic (routed count + j) reads the new routed count.
# ``expert_layers_field``: the config field counting decoder layers where it is not ``num_hidden_layers``.
EXTRA_ROW_PRUNING_FIELDS = (
    "expert_extra_rows_field",
    "expert_extra_row_tensors",
    "expert_total_count_attributes",
    "expert_layers_field",
)
COUNT_FIELD_CANDIDATES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


# -- routing rules ----------------------------------------------------------------------------------
# Each family's router as a pure function of (router module, router logits, selection bias). They reproduce
# the stock routers exactly (tests check bit equality) and add a per-expert ``selection_bias`` to the scores
# used to *choose* experts but not to the combine weights. That one mechanism serves aux-loss-free load
# balancing (DeepSeek-V3's rule: select on score + b, weight with the raw score), which pruned models keep
# as a buffer and apply at inference, and soft masking before removal (-inf: never select the expert).
# They live here, not in hf_moeprune.adapters, because a model loaded with trust_remote_code needs them.


def _select(scores: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None) -> torch.Tensor:
    choice = scores if selection_bias is None else scores + selection_bias.to(scores.dtype)
    return torch.topk(choice, top_k, dim=-1).indices


def softmax_topk_renorm(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Mixtral: softmax over all experts, top-k, renormalise over the chosen k (weights stay fp32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    indices = _select(probs, router.top_k, selection_bias)
    weights = probs.gather(-1, indices)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights, indices


def softmax_topk(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Qwen2/3-MoE, OLMoE, Jamba: softmax over all experts, top-k, renormalise only with ``norm_topk_prob``
    (Jamba's router has no such attribute and never renormalises)."""
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    indices = _select(probs, router.top_k, selection_bias)
    weights = probs.gather(-1, indices)
    if getattr(router, "norm_topk_prob", False):
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


def topk_softmax(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """GPT-OSS: top-k on the (biased) logits, softmax over the chosen k only."""
    indices = _select(logits, router.top_k, selection_bias)
    values = logits.gather(-1, indices)
    return torch.softmax(values, dim=1, dtype=values.dtype), indices


GROUP_SCORES = {
    # DeepSeek-V3, Mistral-4: a group scores the sum of its two best members; DeepSeek-V2: its best member
    "top2_sum": lambda grouped: grouped.topk(2, dim=-1)[0].sum(dim=-1),
    "max": lambda grouped: grouped.max(dim=-1).values,
}


def _outside_best_groups(router, choice: torch.Tensor, group_score: str) -> torch.Tensor:
    """``[tokens, experts]`` True where an expert is outside the router's best ``topk_group`` of its ``num_group``
    groups of contiguous experts (group-limited routing), scored on ``choice`` by ``GROUP_SCORES[group_score]``."""
    groups, num_experts = router.num_group, router.num_experts
    group_scores = GROUP_SCORES[group_score](choice.view(-1, groups, num_experts // groups))
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, groups, num_experts // groups).reshape(-1, num_experts)
    return ~score_mask.bool()


def _sigmoid_grouped(router, logits, selection_bias, sorted_topk: bool, masked_value: float):
    """Sigmoid scores + e_score_correction_bias, the best ``topk_group`` groups by the sum of their top-2 members
    (skipped when the router has no groups: ``num_group`` None), top-k inside them, weights = the raw scores of the
    chosen experts, renormalised with ``norm_topk_prob``, x ``routed_scaling_factor`` where the router applies it."""
    scores = logits.sigmoid()
    choice = scores + router.e_score_correction_bias
    if selection_bias is not None:
        choice = choice + selection_bias.to(choice.dtype)
    if router.num_group is not None:
        choice = choice.masked_fill(_outside_best_groups(router, choice, "top2_sum"), masked_value)
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=sorted_topk)[1]
    weights = scores.gather(1, indices)
    if router.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    scale = getattr(router, "routed_scaling_factor", None)  # Beam scales the MoE block's output instead
    return (weights if scale is None else weights * scale), indices


def sigmoid_group_limited(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """DeepSeek-V3: sigmoid scores + e_score_correction_bias, best ``topk_group`` groups, unsorted top-k inside them
    (the other groups' experts masked with -inf)."""
    return _sigmoid_grouped(router, logits, selection_bias, sorted_topk=False, masked_value=float("-inf"))


def sigmoid_group_limited_sorted(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Beam: DeepSeek-V3's rule with a sorted top-k and no scaling in the router (the MoE block scales its output)."""
    return _sigmoid_grouped(router, logits, selection_bias, sorted_topk=True, masked_value=float("-inf"))


def sigmoid_group_limited_zero_fill(
    router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None
):
    """A.X K2: DeepSeek-V3's rule with the other groups' experts masked with 0.0 (as its reference implementation
    does; a negative corrected score can then lose to a masked expert), groups optional (``n_group`` None)."""
    return _sigmoid_grouped(router, logits, selection_bias, sorted_topk=False, masked_value=0.0)


def _sigmoid_topk(router, logits, selection_bias, sorted_topk: bool):
    scores = torch.sigmoid(logits.float())
    choice = scores
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is not None:
        choice = choice + bias.to(scores.dtype)
    if selection_bias is not None:
        choice = choice + selection_bias.to(scores.dtype)
    indices = torch.topk(choice, router.top_k, dim=-1, sorted=sorted_topk).indices
    weights = scores.gather(-1, indices)
    if getattr(router, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def sigmoid_topk(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Flint, Laguna: fp32 sigmoid scores, sorted top-k on score (+ the router's ``e_score_correction_bias`` where it
    has one: Laguna), weights = the chosen raw scores, renormalised (Flint: if ``norm_topk_prob``)."""
    return _sigmoid_topk(router, logits, selection_bias, sorted_topk=True)


def sigmoid_topk_unsorted(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """MiniMax-M3-VL (language model): `sigmoid_topk` with an unsorted top-k."""
    return _sigmoid_topk(router, logits, selection_bias, sorted_topk=False)


def sigmoid_topk_unsorted_scaled(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Ergo, Muse-Spark (language model): fp32 sigmoid scores (Muse-Spark's logits come already x its
    ``output_multiplier``), unsorted top-k on score + ``e_score_correction_bias``, the chosen raw scores renormalised
    over their sum + ``norm_topk_prob_eps`` (Ergo: 1e-20), x ``routed_scaling_factor``."""
    scores = torch.sigmoid(logits.float())
    choice = scores + router.e_score_correction_bias.to(scores.dtype)
    if selection_bias is not None:
        choice = choice + selection_bias.to(scores.dtype)
    indices = torch.topk(choice, router.top_k, dim=-1, sorted=False).indices
    weights = scores.gather(-1, indices)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + getattr(router, "norm_topk_prob_eps", 1e-20))
    return weights * router.routed_scaling_factor, indices


def logit_topk_sigmoid(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Kolibri-1: top-k on the logits + e_score_correction_bias, weights = sigmoid of the chosen logits, renormalised
    with ``norm_topk_prob``."""
    indices = _select(logits + router.e_score_correction_bias, router.top_k, selection_bias)
    weights = logits.gather(1, indices).sigmoid()
    if router.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def logit_topk_sigmoid_unnormalized(
    router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None
):
    """Llama 4: sorted top-k on the logits, weights = fp32 sigmoid of the chosen logits in the logits' dtype, never
    renormalised (the router returns them scattered over all experts: see ``ROUTER_OUTPUTS["scores_logits"]``)."""
    indices = _select(logits, router.top_k, selection_bias)
    # the sigmoid runs on the [tokens, experts] layout the router uses: CPU kernels round the vectorised part and the
    # tail of a tensor differently, so a sigmoid of the [tokens, k] values alone can differ in the last bit
    scattered = torch.full_like(logits, float("-inf")).scatter(1, indices, logits.gather(1, indices))
    return torch.sigmoid(scattered.float()).to(logits.dtype).gather(1, indices), indices


def _masked_probability(selection_bias: torch.Tensor | None) -> float:
    # the stock softmax routers fill 0.0 (probabilities are positive); a selection bias may be negative or -inf, so
    # then only -inf keeps the masked groups out
    return 0.0 if selection_bias is None else float("-inf")


def softmax_topk_scaled(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """DeepSeek-V2: fp32 softmax over all experts, top-k (``greedy``, or ``group_limited_greedy``: the best
    ``topk_group`` groups by their maximum score), unsorted, never renormalised, x ``routed_scaling_factor``."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    choice = scores if selection_bias is None else scores + selection_bias.to(scores.dtype)
    if router.topk_method == "group_limited_greedy":
        choice = choice.masked_fill(_outside_best_groups(router, choice, "max"), _masked_probability(selection_bias))
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    return scores.gather(-1, indices) * router.routed_scaling_factor, indices


def softmax_group_limited(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Mistral-Small-4 (mistral4), Mistral-Large-4's language model: softmax over all experts (in the logits' dtype;
    Mistral-Large-4's logits are fp32), the best ``topk_group`` of ``num_group`` groups by the sum of their top-2
    members (DeepSeek-V3's group score on probabilities, no correction bias), unsorted top-k inside them, weights = the
    chosen probabilities, renormalised (+1e-20) with ``norm_topk_prob`` (Mistral-Large-4's router has no such switch:
    always), x ``routed_scaling_factor``."""
    scores = logits.softmax(-1)
    choice = scores if selection_bias is None else scores + selection_bias.to(scores.dtype)
    choice = choice.masked_fill(_outside_best_groups(router, choice, "top2_sum"), _masked_probability(selection_bias))
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if getattr(router, "norm_topk_prob", True):
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * router.routed_scaling_factor, indices


def softmax_topk_renorm_biased(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """Ernie-4.5-MoE: fp32 softmax, top-k on probabilities + ``moe_statics.e_score_correction_bias`` ([1, experts]),
    weights renormalised over the chosen k with the sum clamped at ``norm_min``."""
    probs = torch.softmax(logits, dim=1, dtype=torch.float)
    indices = _select(router.moe_statics(probs), router.top_k, selection_bias)
    weights = probs.gather(-1, indices)
    return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=router.norm_min), indices


def _sigmoid_topk_block_bias(router, logits, selection_bias, correction_bias, sorted_topk: bool):
    scores = torch.sigmoid(logits.float())
    choice = scores + correction_bias
    if selection_bias is not None:
        choice = choice + selection_bias.to(choice.dtype)
    indices = torch.topk(choice, router.top_k, dim=-1, sorted=sorted_topk).indices
    weights = scores.gather(1, indices)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    # HY-V3: router_scaling_factor, AFMoE: route_scale; MiniMax-M2 has neither
    scale = getattr(router, "router_scaling_factor", None) or getattr(router, "route_scale", None)
    return (weights * scale if scale is not None else weights), indices


def sigmoid_topk_block_bias(
    router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None, correction_bias=None
):
    """MiniMax-M2, HY-V3: fp32 sigmoid scores, unsorted top-k on score + the MoE block's ``e_score_correction_bias``
    (the router's second argument), renormalised, x ``router_scaling_factor`` where the router has one (HY-V3)."""
    return _sigmoid_topk_block_bias(router, logits, selection_bias, correction_bias, sorted_topk=False)


def sigmoid_topk_block_bias_sorted(
    router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None, expert_bias=None
):
    """AFMoE: `sigmoid_topk_block_bias` with a sorted top-k, on the block's ``expert_bias``, x ``route_scale``."""
    return _sigmoid_topk_block_bias(router, logits, selection_bias, expert_bias, sorted_topk=True)


def sigmoid_topk_expert_bias(
    router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None, expert_bias=None
):
    """LFM2-MoE: sigmoid scores, sorted top-k on score + the MoE block's ``expert_bias`` (the router's second
    argument, when ``use_expert_bias``), renormalised with ``norm_topk_prob`` (+1e-6), x ``routed_scaling_factor``."""
    scores = logits.sigmoid()
    choice = scores if expert_bias is None else scores + expert_bias
    if selection_bias is not None:
        choice = choice + selection_bias.to(choice.dtype)
    indices = torch.topk(choice, k=router.top_k, dim=-1).indices
    weights = torch.gather(scores, dim=1, index=indices).type_as(logits)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    return weights * router.routed_scaling_factor, indices


def softmax_topk_renorm_expert_scale(
    router: nn.Module, probs: torch.Tensor, selection_bias: torch.Tensor | None = None
):
    """Gemma-4: the router returns fp32 probabilities (not logits); top-k (``config.top_k_experts``), renormalised
    over the k, x the router's learned ``per_expert_scale`` of each chosen expert."""
    indices = _select(probs, router.config.top_k_experts, selection_bias)
    weights = probs.gather(-1, indices)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights * router.per_expert_scale[indices], indices


def score_fn_topk(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """DeepSeek-V4, Inkling-2: the router's own ``score_fn`` (``config.scoring_func``: sigmoid, sqrtsoftplus, ...),
    unsorted top-k on score + ``e_score_correction_bias``, renormalised (+1e-20), x ``routed_scaling_factor``."""
    scores = router.score_fn(logits)
    choice = scores + router.e_score_correction_bias
    if selection_bias is not None:
        choice = choice + selection_bias.to(choice.dtype)
    indices = torch.topk(choice, router.top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, indices)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, indices


def _pad_to_width(selection_bias: torch.Tensor, width: int) -> torch.Tensor:
    """A routed experts' selection bias, widened with zeros to the router's rows when extra rows (LongCat's
    zero-computation experts) follow the routed experts: those rows are never biased nor masked."""
    missing = width - selection_bias.shape[-1]
    return selection_bias if missing <= 0 else nn.functional.pad(selection_bias, (0, missing))


def softmax_topk_biased_scaled(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """LongCat-Flash: softmax over the routed and the zero-computation experts' logits, unsorted top-k on probability
    + ``e_score_correction_bias``, weights = the chosen probabilities x ``routed_scaling_factor``, never renormalised.
    Indices >= the routed count choose a zero-computation (identity) expert."""
    scores = logits.softmax(dim=-1)
    choice = scores + router.e_score_correction_bias.unsqueeze(0)
    if selection_bias is not None:
        choice = choice + _pad_to_width(selection_bias, choice.shape[-1]).to(choice.dtype)
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices) * router.routed_scaling_factor
    return weights.to(logits.dtype), indices


def logsigmoid_topk_shared(
    router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None, hidden_states=None
):
    """Inkling: the router's rows are the routed experts then ``n_shared_experts`` shared experts; fp32 sigmoid
    scores, unsorted top-k over the routed ones on score + ``e_score_correction_bias``, then the chosen routed logits
    and the shared logits normalised together (log-sigmoid, softmax over them), x ``route_scale`` x
    ``global_scale``. The router returns the routed logits only, so the rule reads its input (``hidden_states``, see
    `ROUTES_READING_INPUTS`) and also returns the shared experts' weights, which depend on the choice."""
    n_shared = router.n_shared_experts
    with torch.autocast(device_type=hidden_states.device.type, enabled=False):  # fp32 as the stock router
        full = nn.functional.linear(hidden_states.reshape(-1, router.hidden_dim).float(), router.weight.float())
        routed_logits, shared_logits = full[..., :-n_shared], full[..., -n_shared:]
        choice = routed_logits.sigmoid() + router.e_score_correction_bias.float()
        if selection_bias is not None:
            choice = choice + selection_bias.to(choice.dtype)
        indices = torch.topk(choice, router.top_k, dim=-1, sorted=False)[1]
        chosen = torch.cat([routed_logits.gather(-1, indices), shared_logits], dim=-1)
        log_probs = nn.functional.logsigmoid(chosen)
        weights = torch.exp(log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True))
        weights = weights * router.route_scale * router.global_scale.float()
    weights = weights.to(hidden_states.dtype)
    return weights[..., : router.top_k].contiguous(), indices, weights[..., -n_shared:].contiguous()


def _sparsemixer_pick(scores: torch.Tensor, candidates: torch.Tensor, jitter_eps: float, selection_bias):
    """One SparseMixer pick in eval mode: the best candidate, and its softmax weight over the candidates whose score is
    within ``2 * jitter_eps`` (relative) of the pick's; with a selection bias the pick is made on candidates + bias."""
    choice = candidates if selection_bias is None else candidates + selection_bias.to(candidates.dtype)
    picked = choice.max(dim=-1, keepdim=True)[1]
    with torch.no_grad():
        threshold = candidates.gather(-1, picked)  # the stock code's row maximum when there is no selection bias
        factor = scores.abs().clamp(min=threshold)
        far = ((threshold - scores) / factor) > (2 * jitter_eps)
    weight = torch.softmax(candidates.masked_fill(far, float("-inf")), dim=-1).gather(-1, picked)
    return weight, picked


def sparsemixer_eval(router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
    """PhiMoE in eval mode: SparseMixer's deterministic top-2 (transformers' ``sparsemixer(training=False)``): the best
    expert, then the best of the rest, each weighted by a softmax over the experts within the router's jitter
    threshold of it. In training the stock router samples experts (Gumbel) with its own gradient estimator, which no
    deterministic rule reproduces: a selection bias is refused there rather than silently changing the training."""
    if router.training:
        raise RuntimeError(
            "PhiMoE's router samples experts in training (SparseMixer); hf_moeprune's selection bias (aux-loss-free "
            "balancing, router_bias_update_rate > 0) applies to it in eval mode only"
        )
    eps = router.router_jitter_noise
    first_weight, first = _sparsemixer_pick(logits, logits, eps, selection_bias)
    rest = torch.scatter(logits, -1, first, float("-inf"))
    second_weight, second = _sparsemixer_pick(logits, rest, eps, selection_bias)
    return torch.cat((first_weight, second_weight), dim=-1), torch.cat((first, second), dim=-1)


ROUTE_FUNCTIONS = {
    "softmax_topk_renorm": softmax_topk_renorm,
    "softmax_topk": softmax_topk,
    "topk_softmax": topk_softmax,
    "sigmoid_group_limited": sigmoid_group_limited,
    "softmax_topk_scaled": softmax_topk_scaled,
    "softmax_topk_renorm_biased": softmax_topk_renorm_biased,
    "sigmoid_topk_block_bias": sigmoid_topk_block_bias,
    "sigmoid_topk_expert_bias": sigmoid_topk_expert_bias,
    "sigmoid_group_limited_sorted": sigmoid_group_limited_sorted,
    "sigmoid_group_limited_zero_fill": sigmoid_group_limited_zero_fill,
    "sigmoid_topk": sigmoid_topk,
    "sigmoid_topk_unsorted": sigmoid_topk_unsorted,
    "sigmoid_topk_block_bias_sorted": sigmoid_topk_block_bias_sorted,
    "sparsemixer_eval": sparsemixer_eval,
    "score_fn_topk": score_fn_topk,
    "logit_topk_sigmoid": logit_topk_sigmoid,
    "sigmoid_topk_unsorted_scaled": sigmoid_topk_unsorted_scaled,
    "logit_topk_sigmoid_unnormalized": logit_topk_sigmoid_unnormalized,
    "softmax_topk_renorm_expert_scale": softmax_topk_renorm_expert_scale,
    "softmax_topk_biased_scaled": softmax_topk_biased_scaled,
    "logsigmoid_topk_shared": logsigmoid_topk_shared,
    "softmax_group_limited": softmax_group_limited,
}
# The rules this file defines, so available to trust_remote_code; hf_moeprune registers families only on these.
BUILTIN_ROUTE_FUNCTIONS = frozenset(ROUTE_FUNCTIONS)
# Rules that read the router's inputs, not only its first output: called with all of the router's positional
# arguments (the hidden states first) after the selection bias, they return (weights, indices, *the router's outputs
# after the indices), which depend on the choice (Inkling's shared experts' weights).
ROUTES_READING_INPUTS = frozenset({"logsigmoid_topk_shared"})


def reroute(
    routing: str,
    router: nn.Module,
    args: tuple,
    output: tuple,
    selection_bias: torch.Tensor | None,
    router_output: str = "logits_weights_indices",
):
    """``output`` of ``router(*args)`` with its experts chosen again by the family rule ``routing`` on score +
    ``selection_bias`` (the logits stay as they are), in the router's own output convention (`ROUTER_OUTPUTS`)."""
    convention = ROUTER_OUTPUTS[router_output]
    reads_inputs = routing in ROUTES_READING_INPUTS
    logits = convention.unpack(router, output)[0]
    # args[1:]: what the MoE block passes besides the hidden states (MiniMax-M2's, LFM2's block-held bias); a rule that
    # reads the router's input (Inkling) also returns the outputs after the indices (the shared experts' weights)
    weights, indices, *rest = ROUTE_FUNCTIONS[routing](
        router, logits, selection_bias, *(args if reads_inputs else args[1:])
    )
    packed = convention.pack(router, output, weights, indices)
    return (*packed[:3], *rest) if reads_inputs else packed


# -- router output conventions ------------------------------------------------------------------------
# What a family's router returns, as a pair of pure functions: ``unpack(router, output) -> (logits, top-k weights,
# top-k indices)`` reads it, ``pack(router, output, weights, indices) -> output`` writes a re-routed choice back in the
# router's own form, so that the hooks of the selection bias and of the statistics work on every family alike.


def _unpack_logits_weights_indices(router: nn.Module, output):
    return output[0], output[1], output[2]


def _pack_logits_weights_indices(router: nn.Module, output, weights: torch.Tensor, indices: torch.Tensor):
    return (output[0], weights.to(output[1].dtype), indices, *output[3:])


def _unpack_scores_logits(router: nn.Module, output):
    # unchosen experts score sigmoid(-inf) = 0 exactly, so the top-k of the scores is the router's choice (also after
    # a selection bias re-routed it); only a chosen logit below about -100 (sigmoid underflowing to 0) would tie
    scores, logits = output[0], output[1]
    indices = torch.topk(scores, router.top_k, dim=-1).indices
    return logits, scores.gather(-1, indices), indices


def _pack_scores_logits(router: nn.Module, output, weights: torch.Tensor, indices: torch.Tensor):
    scores = torch.zeros_like(output[0]).scatter(-1, indices, weights.to(output[0].dtype))
    return (scores, *output[1:])


@dataclass(frozen=True)
class RouterOutput:
    """One router output convention: how to read (logits, weights, indices) off it and write a choice back."""

    unpack: Callable
    pack: Callable
    description: str

    def __post_init__(self):
        if not (callable(self.unpack) and callable(self.pack)):
            raise TypeError(f"RouterOutput needs callable unpack and pack, got {self.unpack!r}, {self.pack!r}")


DEFAULT_ROUTER_OUTPUT = "logits_weights_indices"
ROUTER_OUTPUTS = {
    DEFAULT_ROUTER_OUTPUT: RouterOutput(
        _unpack_logits_weights_indices,
        _pack_logits_weights_indices,
        "(logits [tokens, experts], top-k weights, top-k indices): transformers v5's MoE routers",
    ),
    "scores_logits": RouterOutput(
        _unpack_scores_logits,
        _pack_scores_logits,
        "(scores [tokens, experts], logits): the chosen experts' combine weights scattered over all experts, 0 "
        "elsewhere (Llama 4)",
    ),
}


# -- router selection bias (aux-loss-free balancing kept with the model) ----------------------------------
SELECTION_BIAS = "selection_bias"  # buffer name on each MoE router
SELECTION_BIAS_FIELDS = ("selection_bias_router", "selection_bias_routing")
# written only for routers whose output is not DEFAULT_ROUTER_OUTPUT (checkpoints saved before it lack it)
SELECTION_BIAS_ROUTER_OUTPUT = "selection_bias_router_output"


def _route_with_selection_bias(router: nn.Module, args, output):
    """Forward hook on a router: choose experts on score + ``router.selection_bias``, weight with the raw score."""
    return reroute(
        router._moeprune_routing, router, args, output, getattr(router, SELECTION_BIAS), router._moeprune_router_output
    )


def attach_selection_bias(model: nn.Module, config) -> None:
    """Give every MoE router of ``model`` a persistent ``selection_bias`` buffer (zeros until set or loaded)
    and the hook that applies it. Driven by ``config.selection_bias_router`` (the router's path inside a
    decoder layer) and ``config.selection_bias_routing`` (a ``ROUTE_FUNCTIONS`` key)."""
    router_path, routing = (getattr(config, f, None) for f in SELECTION_BIAS_FIELDS)
    if routing not in ROUTE_FUNCTIONS:
        raise PrunedConfigError(f"selection_bias_routing={routing!r} is not one of {sorted(ROUTE_FUNCTIONS)}")
    router_output = getattr(config, SELECTION_BIAS_ROUTER_OUTPUT, None) or DEFAULT_ROUTER_OUTPUT
    if router_output not in ROUTER_OUTPUTS:
        raise PrunedConfigError(
            f"{SELECTION_BIAS_ROUTER_OUTPUT}={router_output!r} is not one of {sorted(ROUTER_OUTPUTS)}"
        )
    name = f"{router_path}.{SELECTION_BIAS}"
    if name not in config.expert_tensor_names:
        config.expert_tensor_names = [*config.expert_tensor_names, name]
    layers = decoder_layers(model, config)
    for layer_idx, count in enumerate(config.experts_per_layer):
        if count is None:
            continue
        try:
            router = layers[layer_idx].get_submodule(router_path)
        except AttributeError:
            raise PrunedConfigError(
                f"layer {layer_idx}: selection_bias_router={router_path!r} names no module of the decoder layer"
            ) from None
        if getattr(router, SELECTION_BIAS, None) is None:
            device = next(router.parameters()).device
            router.register_buffer(SELECTION_BIAS, torch.zeros(count, dtype=torch.float32, device=device))
        router._moeprune_routing = routing
        router._moeprune_router_output = router_output
        if not getattr(router, "_moeprune_bias_hooked", False):
            router.register_forward_hook(_route_with_selection_bias)
            router._moeprune_bias_hooked = True


class PrunedConfigError(ValueError):
    """A pruned-model config is inconsistent with itself or with the weights."""


# -- transformers' own per-layer convention (HeterogeneousConfigMixin, transformers >= 5.24) ---------------------------
# Every transformers config takes ``per_layer_config={layer: {attribute: value}}`` (only the layers that differ from
# the global value; saved zero-padded, ``{"1": {"num_local_experts": 4}}``) and answers
# ``config.per_layer_config[i].<attribute>``. A pruned model records its counts there too, under its expert count
# field, so transformers' machinery reads them. Once an attribute is per-layer, reading the global value raises
# AmbiguousGlobalPerLayerAttributeError unless ``allow_global_per_layer_attribute_access`` is set; the stock MoE
# modeling of 5.24 reads the global count (no MoE family builds its experts from ``per_layer_config``), and the pruned
# classes build each layer from ``experts_per_layer`` with the global count as the widest layer's, so the flag is
# set (and saved) whenever a count is per-layer. A uniform layout has no per-layer count: neither is written, and
# the stock export stays a plain stock config.
ALLOW_GLOBAL = "allow_global_per_layer_attribute_access"


def global_expert_count(fields, field: str) -> int:
    """The global (widest) count, also when ``field`` is already per-layer: the flag is transformers' public way to
    read it; it is left as it was (it lives in the instance dict in 5.24, from where ``to_dict`` would save it)."""
    per_layer = getattr(fields, "per_layer_attributes", None) or ()
    if field not in per_layer or fields.allow_global_per_layer_attribute_access:
        return getattr(fields, field)
    fields.allow_global_per_layer_attribute_access = True
    try:
        return getattr(fields, field)
    finally:
        vars(fields).pop(ALLOW_GLOBAL, None)


def record_per_layer_counts(config) -> None:
    """Mirror ``experts_per_layer`` into transformers' ``per_layer_config`` of the config holding the count field
    (the text sub-config of a vision-language model): one override per MoE layer narrower than the global count."""
    fields, field = moe_config(config), _count_field(config)
    widest = global_expert_count(fields, field)
    overrides = {i: {field: n} for i, n in enumerate(config.experts_per_layer) if n is not None and n != widest}
    if overrides:
        per_layer = set(getattr(fields, "per_layer_attributes", None) or ())
        if per_layer - {field} or (getattr(fields, "is_heterogeneous", False) and field not in per_layer):
            # the family's own per-layer overrides (Gemma 4's full-attention layers) are left alone: replacing
            # per_layer_config would drop them, so experts_per_layer alone records the counts
            logger.info("the config has per-layer overrides of its own; expert counts recorded in experts_per_layer")
            return
        fields.allow_global_per_layer_attribute_access = True  # saved with the config: stock code reads the widest
        fields.per_layer_config = overrides
        if not _layer_types_resolve(fields):
            # e.g. Gemma 4 builds its rotary embeddings from ``per_layer_config[layer_type]``, which transformers
            # refuses once layers of one type differ: counts that differ within a layer type stay out of it
            fields.per_layer_config = None
            vars(fields).pop(ALLOW_GLOBAL, None)
            logger.info("expert counts differ within a layer type; recorded in experts_per_layer only")
    elif (getattr(fields, "per_layer_attributes", None) or set()) == {field}:  # only ours: nothing else to keep
        fields.per_layer_config = None
        vars(fields).pop(ALLOW_GLOBAL, None)


def _layer_types_resolve(fields) -> bool:
    """Whether ``per_layer_config[layer_type]`` answers for every layer type, as modeling code that builds per-type
    modules (rotary embeddings) asks it."""
    for layer_type in set(getattr(fields, "layer_types", None) or ()):
        try:
            fields.per_layer_config[layer_type]
        except ValueError:
            return False
    return True


def per_layer_counts(config, field: str | None = None) -> dict[int, int]:
    """``{layer: count}`` for the layers to which ``config``'s ``per_layer_config`` gives an expert count other than
    the global one: recorded by `record_per_layer_counts`, or by anyone following transformers' convention. ``field``:
    the count field (default: the pruned config's, else any of ``COUNT_FIELD_CANDIDATES`` made per-layer)."""
    fields = moe_config(config)
    per_layer = getattr(fields, "per_layer_attributes", None) or set()
    if field is None and getattr(config, "original_num_experts", None) is not None:
        field = _count_field(config)
    names = [field] if field else [name for name in COUNT_FIELD_CANDIDATES if name in per_layer]
    counts = {}
    for name in names:
        if name not in per_layer:
            continue
        widest = global_expert_count(fields, name)
        for layer in range(fields.num_hidden_layers):
            value = getattr(fields.per_layer_config[layer], name)
            if value != widest:
                counts[layer] = value
    return counts


def moe_config(config):
    """The config holding the MoE fields: the config itself, or the sub-config ``expert_config_path`` names (a
    vision-language model's ``text_config``)."""
    path = getattr(config, "expert_config_path", None)
    return getattr(config, path) if path else config


def decoder_layers(model: nn.Module, config) -> nn.ModuleList:
    """The MoE decoder layers: ``model.layers``, or where ``expert_layers_path`` says (a vision-language model's
    ``model.language_model.layers``)."""
    return model.get_submodule(getattr(config, "expert_layers_path", None) or "model.layers")


def get_submodule_attr(root: nn.Module, dotted: str):
    """Resolve ``"mlp.gate.weight"`` relative to ``root``; returns ``(owner_module, attr_name)``."""
    owner_path, _, attr = dotted.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return owner, attr


def with_extra_rows(index: torch.Tensor, old_count: int, extra_rows: int) -> torch.Tensor:
    """``index`` over the routed experts, followed by the ``extra_rows`` rows after the old ``old_count`` routed
    ones (unpruned, in order): the rows a tensor with extra rows keeps."""
    tail = torch.arange(old_count, old_count + extra_rows, dtype=index.dtype, device=index.device)
    return torch.cat((index, tail))


def resize_expert_tensors(
    layer: nn.Module,
    tensor_names: list[str],
    count_attributes: list[str],
    num_experts: int,
    index: torch.Tensor | None = None,
    extra_rows: int = 0,
    extra_row_tensors: list[str] = (),
    total_count_attributes: list[str] = (),
) -> list[str]:
    """Give every per-expert tensor of one decoder layer ``num_experts`` rows along dim 0.

    With ``index`` the rows are ``tensor[index]`` (expert surgery: prune or permute). Without it the
    rows are left uninitialised (load time: the checkpoint fills them). Names that the layer does
    not have are skipped (e.g. a bias a family only sometimes has); the names actually resized are
    returned. Each tensor is replaced one at a time, so at most one extra tensor is alive.
    ``extra_row_tensors`` hold ``extra_rows`` more rows after the routed experts' (not routed experts: LongCat's
    zero-computation experts); they keep those rows at the end, and ``total_count_attributes`` become
    ``num_experts + extra_rows``.
    """
    resized = []
    before = None  # the routed-expert count before resizing, read off the first tensor (the router weight)
    for name in tensor_names:
        try:
            owner, attr = get_submodule_attr(layer, name)
        except AttributeError:
            continue
        old = getattr(owner, attr, None)
        if not isinstance(old, torch.Tensor):
            continue
        extra = extra_rows if name in extra_row_tensors else 0
        routed = old.shape[0] - extra
        before = routed if before is None else before
        # experts are on dim 0, except in [1, experts] statistics (Ernie-4.5's e_score_correction_bias)
        axis = 1 if old.dim() == 2 and old.shape[0] == 1 and old.shape[1] == before != 1 else 0
        if index is not None:
            rows = with_extra_rows(index, routed, extra) if extra else index
            data = old.detach().index_select(axis, rows.to(old.device))
        else:
            shape = list(old.shape)
            shape[axis] = num_experts + extra
            data = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(data, requires_grad=old.requires_grad)
            setattr(owner, attr, new)
            if isinstance(owner, nn.Linear) and attr == "weight":  # a router that is an nn.Linear itself (Llama 4)
                owner.out_features = data.shape[0]
        else:
            persistent = attr not in getattr(owner, "_non_persistent_buffers_set", set())
            owner.register_buffer(attr, data, persistent=persistent)
        resized.append(name)
    for name in count_attributes:
        try:
            owner, attr = get_submodule_attr(layer, name)
        except AttributeError:
            continue
        if hasattr(owner, attr):
            setattr(owner, attr, num_experts)
    for name in total_count_attributes:
        try:
            owner, attr = get_submodule_attr(layer, name)
        except AttributeError:
            continue
        if hasattr(owner, attr):
            setattr(owner, attr, num_experts + extra_rows)
    return resized


def extra_row_layout(config) -> dict:
    """The keyword arguments of `resize_expert_tensors` for a family whose routers score rows after the routed
    experts, read from a pruned config (empty for the others)."""
    field = getattr(config, "expert_extra_rows_field", None)
    if not field:
        return {}
    return dict(
        extra_rows=int(getattr(moe_config(config), field) or 0),
        extra_row_tensors=list(getattr(config, "expert_extra_row_tensors", None) or ()),
        total_count_attributes=list(getattr(config, "expert_total_count_attributes", None) or ()),
    )


def num_decoder_layers(config) -> int:
    """Decoder layers of a pruned config: ``expert_layers_field`` where recorded (LongCat's ``num_layers``), else
    ``num_hidden_layers``."""
    return int(getattr(moe_config(config), getattr(config, "expert_layers_field", None) or "num_hidden_layers"))


def pad_router_logits(router_logits) -> tuple[torch.Tensor, ...]:
    """Every layer's router logits at the widest layer's width, the missing experts' columns ``-inf``.

    Code written for stock models (transformers' ``load_balancing_loss_func``, which TRL calls, concatenates all
    layers) then runs on per-layer expert counts: a ``-inf`` logit has probability 0 and is never in the top-k, so
    every routing decision and every expert's share are unchanged; only the stock function's ``num_experts`` factor
    is the widest count."""
    tensors = tuple(router_logits)
    width = max(t.shape[-1] for t in tensors)
    return tuple(
        t if t.shape[-1] == width else nn.functional.pad(t, (0, width - t.shape[-1]), value=float("-inf"))
        for t in tensors
    )


def _pad_router_logits_hook(module, args, output):
    logits = getattr(output, "router_logits", None)
    if not isinstance(logits, (tuple, list)) or len({t.shape[-1] for t in logits}) <= 1:
        return None
    output.router_logits = pad_router_logits(logits)
    return output


def enable_router_logit_padding(model: nn.Module) -> None:
    """Pad the backbone's ``router_logits`` output (not the routers: routing never sees the padding). On the
    backbone, because TRL's fused LM head calls it directly, bypassing the causal-LM forward."""
    backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module) or getattr(backbone, "_moeprune_pads_router_logits", False):
        return
    backbone.register_forward_hook(_pad_router_logits_hook)
    backbone._moeprune_pads_router_logits = True


def heterogeneous_load_balancing_loss(
    router_logits,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    score_fn=None,
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss computed per layer, for layers with different expert counts.

    Per layer ``l``: ``E_l * k * sum_i f_i * P_i`` with ``f_i`` the fraction of (token, slot) pairs routed to
    expert ``i`` and ``P_i`` its mean router probability; the result is the mean over layers. (The stock
    ``load_balancing_loss_func`` pools all layers' tokens into one histogram, which needs one width; per layer
    is the Switch paper's definition.) ``score_fn`` maps logits to probabilities (default softmax); scores
    that do not sum to one (sigmoid routers) are normalised per token.
    """
    if isinstance(router_logits, dict):
        router_logits = list(router_logits.values())
    losses = []
    for logits in router_logits:
        if logits.shape[0] and not bool(torch.isfinite(logits[0]).all()):
            logits = logits[:, torch.isfinite(logits[0])]  # padded by pad_router_logits: the layer's own width
        num_experts = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1) if score_fn is None else score_fn(logits)
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        _, selected = torch.topk(probs, top_k, dim=-1)
        dispatch = nn.functional.one_hot(selected, num_experts).float().sum(dim=1)  # [T, E]
        if attention_mask is not None and attention_mask.numel() == logits.shape[0]:
            weight = attention_mask.reshape(-1, 1).to(probs.dtype)
        else:
            weight = torch.ones(logits.shape[0], 1, dtype=probs.dtype, device=probs.device)
        tokens = weight.sum().clamp_min(1.0)
        f = (dispatch * weight).sum(0) / (tokens * top_k)
        p = (probs * weight).sum(0) / tokens
        # x top_k: the scale of transformers' load_balancing_loss_func (top_k when perfectly balanced), so the
        # configs' router_aux_loss_coef values mean the same thing here
        losses.append(num_experts * top_k * (f * p).sum())
    return torch.stack(losses).mean()


def check_pruned_config(config) -> None:
    """Fail early, naming the layer and values, when the pruning fields contradict each other."""
    missing = [f for f in PRUNING_FIELDS if getattr(config, f, None) is None]
    if missing:
        raise PrunedConfigError(f"pruned config of model_type {config.model_type!r} is missing field(s) {missing}")
    counts = config.experts_per_layer
    ids = config.kept_expert_ids
    num_layers = num_decoder_layers(config)
    if len(counts) != num_layers or len(ids) != num_layers:
        raise PrunedConfigError(
            f"experts_per_layer has {len(counts)} entries and kept_expert_ids {len(ids)}, but "
            f"{getattr(config, 'expert_layers_field', None) or 'num_hidden_layers'} is {num_layers}"
        )
    for layer, (count, kept) in enumerate(zip(counts, ids)):
        if (count is None) != (kept is None):
            raise PrunedConfigError(f"layer {layer}: experts_per_layer={count} but kept_expert_ids={kept}")
        if count is None:
            continue
        if not isinstance(count, int) or count < 1:
            raise PrunedConfigError(f"layer {layer}: experts_per_layer={count!r} is not a positive integer")
        if len(kept) != count:
            raise PrunedConfigError(
                f"layer {layer}: experts_per_layer={count} but kept_expert_ids lists {len(kept)} ids {kept}"
            )
        if len(set(kept)) != len(kept) or any(not 0 <= i < config.original_num_experts for i in kept):
            raise PrunedConfigError(
                f"layer {layer}: kept_expert_ids={kept} must be distinct ids in [0, {config.original_num_experts})"
            )
    for layer, count in per_layer_counts(config).items():
        if layer >= len(counts) or counts[layer] != count:
            declared = counts[layer] if layer < len(counts) else None
            raise PrunedConfigError(
                f"layer {layer}: per_layer_config gives {_count_field(config)}={count} but experts_per_layer={declared}"
            )


def _describe_mismatches(config, mismatched) -> str:
    lines = []
    for key, checkpoint_shape, model_shape in sorted(mismatched, key=lambda m: m[0]):
        match = re.search(r"layers\.(\d+)\.", key)
        layer = int(match.group(1)) if match else None
        declared = config.experts_per_layer[layer] if layer is not None else None
        lines.append(
            f"layer {layer}: config says experts_per_layer={declared} but checkpoint tensor {key} has shape "
            f"{list(checkpoint_shape)} (the config implies {list(model_shape)})"
        )
    return "pruned checkpoint does not match its config:\n  " + "\n  ".join(lines)


def _align_cpu_tensors(model: nn.Module, alignment: int = 64) -> None:
    """Copy CPU tensors that safetensors memory-mapped at unaligned addresses into aligned memory.

    BLAS kernels take different SIMD paths for unaligned data, which changes the last bits of the
    logits; after this the reloaded model computes bit-identical outputs to the in-memory one.
    """
    for module in model.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is None or tensor.device.type != "cpu" or tensor.data_ptr() % alignment == 0:
                continue
            tensor.data = tensor.data.clone()


class PrunedMoEMixin:
    """Behaviour shared by every pruned causal-LM class; combined with a stock class by `make_pruned_classes`."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        want_info = kwargs.pop("output_loading_info", False)
        # Load with mismatches allowed so that they can be reported per layer, then refuse them.
        model, info = super().from_pretrained(*args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
        if info.get("mismatched_keys") and not ignore_mismatched:
            raise PrunedConfigError(_describe_mismatches(model.config, info["mismatched_keys"]))
        _align_cpu_tensors(model)
        return (model, info) if want_info else model

    def _resize_to_config(self, config) -> None:
        layers = decoder_layers(self, config)
        for layer_idx, count in enumerate(config.experts_per_layer):
            if count is None:
                continue
            resized = resize_expert_tensors(
                layers[layer_idx],
                config.expert_tensor_names,
                config.expert_count_attributes,
                count,
                **extra_row_layout(config),
            )
            if not resized:
                raise PrunedConfigError(
                    f"layer {layer_idx}: experts_per_layer={count} but the layer has none of the expert "
                    f"tensors {config.expert_tensor_names}"
                )
            owners = {id(o): o for o in (get_submodule_attr(layers[layer_idx], n)[0] for n in resized)}
            for module in owners.values():
                if not any(t.is_meta for t in module.parameters(recurse=False)):
                    # Direct construction (not from_pretrained): give the new rows the family's own init.
                    self._init_weights(module)

    def save_pretrained(self, save_directory, *args, export_stock: bool = True, **kwargs):
        """Save the pruned model.

        When every MoE layer keeps the same number of experts and ``export_stock`` is True (the default),
        the stock architecture is written (e.g. ``model_type: mixtral`` with a smaller expert count), so
        plain transformers and vLLM load it; the pruning provenance goes under ``moeprune_provenance``.
        Otherwise, and always when the routers carry a learned selection bias (which stock routers cannot
        apply), the pruned format is written together with this file and an ``auto_map``.
        """
        counts = {c for c in self.config.experts_per_layer if c is not None}
        biased = getattr(self.config, "selection_bias_routing", None) is not None
        if export_stock and len(counts) == 1 and biased:
            logger.info(
                "saving in the hf_moeprune format, not as stock %s: the stock router cannot apply the learned "
                "selection bias", self.config.base_model_type,
            )  # fmt: skip
        # hf_moeprune-quantized weights stay in the pruned format: under a stock model_type, transformers without
        # hf_moeprune would skip the unknown quant_method and load random weights; here it refuses (see above).
        quantized = _quant_method(self.config) == HF_MOEPRUNE_QUANT_METHOD
        if not (export_stock and len(counts) == 1) or biased or quantized:
            # every auto class that loads the stock class loads the pruned one (Gemma-4's composite class is also
            # its AutoModelForCausalLM class); save_pretrained adds the class's own _auto_class to these
            name = f"{__name__.rpartition('.')[2]}.{type(self).__name__}"
            extra = {auto: name for auto in stock_auto_classes(self.config.base_model_type, self.stock_model_class)}
            self.config.auto_map = {**extra, **(getattr(self.config, "auto_map", None) or {})}
            return super().save_pretrained(save_directory, *args, **kwargs)
        config = self.config
        pruned_config_cls, pruned_model_cls = type(config), type(self)
        fields = {name: config.__dict__.pop(name) for name in PRUNING_FIELDS}
        optional = (*OPTIONAL_PRUNING_FIELDS, *COMPOSITE_PRUNING_FIELDS, *EXTRA_ROW_PRUNING_FIELDS)
        fields.update({name: config.__dict__.pop(name) for name in optional if name in config.__dict__})
        config.moeprune_provenance = dict(fields)
        config.__class__, self.__class__ = self.stock_config_class, self.stock_model_class
        try:
            return self.save_pretrained(save_directory, *args, **kwargs)
        finally:
            config.__class__, self.__class__ = pruned_config_cls, pruned_model_cls
            del config.moeprune_provenance
            config.__dict__.update(fields)

    def _router_widths_differ(self) -> bool:
        counts = [c for c in self.config.experts_per_layer if c is not None]
        return len(set(counts)) > 1

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_router_logits=None, **kwargs):
        want_router_logits = (
            output_router_logits
            if output_router_logits is not None
            else getattr(self.config, "output_router_logits", False)
        )
        base_has_aux = hasattr(self, "router_aux_loss_coef")
        if not (want_router_logits and base_has_aux and self._router_widths_differ()):
            if base_has_aux:
                kwargs["output_router_logits"] = output_router_logits
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        # Stock heads concatenate router logits across layers, which fails for per-layer widths: run the
        # decoder, then the head and a per-layer aux loss here.
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = heterogeneous_load_balancing_loss(outputs.router_logits, _top_k(self.config), attention_mask)
        if loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


HF_MOEPRUNE_QUANT_METHOD = "hf_moeprune"  # the quant_method of hf_moeprune's packed format (issue 14)


def _quant_method(config) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        return quantization.get("quant_method")
    return getattr(quantization, "quant_method", None)


def refuse_unloadable_quantization(config) -> None:
    """Fail loudly instead of building a model that would be filled with random weights.

    transformers skips a quant_method it does not know with a warning only, and then every packed tensor is
    "unexpected" and every weight "missing" (randomly initialised). hf_moeprune's packed tensors are read by
    its own transformers quantizer, registered by ``import hf_moeprune``; this file runs without it under
    ``trust_remote_code``, so it checks that the quantizer is there.
    """
    if _quant_method(config) != HF_MOEPRUNE_QUANT_METHOD:
        return
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    if HF_MOEPRUNE_QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        raise ImportError(
            "this checkpoint is quantized in hf_moeprune's packed format (quantization_config.quant_method="
            "'hf_moeprune'), which only hf_moeprune's quantizer reads: `pip install hf_moeprune` and "
            "`import hf_moeprune` before from_pretrained. To serve it without hf_moeprune, quantize the "
            "full-precision model with `hf-moeprune quantize --format compressed-tensors` instead"
        )


def _count_field(config) -> str:
    """The config field holding the routed-expert count: recorded in the config, or (checkpoints saved before
    it was recorded) the first usual name whose value is the original count."""
    recorded = getattr(config, "expert_count_field", None)
    if recorded:
        return recorded
    for name in COUNT_FIELD_CANDIDATES:
        if getattr(moe_config(config), name, None) == config.original_num_experts:
            return name
    raise PrunedConfigError(
        f"cannot tell which config field holds the expert count (tried {COUNT_FIELD_CANDIDATES}); "
        f"set expert_count_field in config.json"
    )


def _top_k(config) -> int:
    return int(getattr(moe_config(config), getattr(config, "expert_top_k_field", None) or "num_experts_per_tok"))


def _make_init(stock_model_cls):
    def __init__(self, config):
        refuse_unloadable_quantization(config)
        check_pruned_config(config)
        count_field = _count_field(config)
        counts = [c for c in config.experts_per_layer if c is not None]
        fields = moe_config(config)
        declared = getattr(fields, count_field)
        # Build the stock skeleton with the smallest count, so that the full-size model is never
        # materialised, then give each layer its own count.
        setattr(fields, count_field, min(counts))
        try:
            stock_model_cls.__init__(self, config)
        finally:
            setattr(fields, count_field, declared)
        if hasattr(self, "num_experts"):
            self.num_experts = declared
        self._resize_to_config(config)
        if getattr(config, "selection_bias_routing", None) is not None:
            attach_selection_bias(self, config)
        enable_router_logit_padding(self)

    return __init__


PRUNED_CLASSES: dict[str, tuple[type, type]] = {}  # stock model_type -> (pruned config, pruned causal LM)
CONFIG_SEPARATOR = "__"  # in a pruned model class named after its stock model class and a foreign config class


def _forward_with_stock_signature(stock_model_cls):
    """PrunedMoEMixin.forward, advertising the stock forward's parameters (plus ``output_router_logits``).

    ``generate`` refuses keyword arguments the forward's signature does not name (a vision-language model's
    ``pixel_values``, ``image_grid_thw``), and Trainer keeps only the dataset columns it names."""
    import inspect

    def forward(self, *args, **kwargs):
        return PrunedMoEMixin.forward(self, *args, **kwargs)

    stock = inspect.signature(stock_model_cls.forward)
    params = [p for p in stock.parameters.values() if p.kind is not p.VAR_KEYWORD]
    if "output_router_logits" not in stock.parameters:
        params.append(inspect.Parameter("output_router_logits", inspect.Parameter.KEYWORD_ONLY, default=None))
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    params.sort(key=lambda p: p.kind)  # keyword-only after positional ones, **kwargs last
    forward.__signature__ = stock.replace(parameters=params)
    forward.__doc__ = PrunedMoEMixin.forward.__doc__
    return forward


AUTO_CLASS_MAPPING_NAMES = {
    "AutoModelForCausalLM": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForImageTextToText": MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
}


def stock_auto_classes(model_type: str, stock_model_cls: type) -> list[str]:
    """The auto classes through which transformers loads ``stock_model_cls`` for ``model_type``."""
    return [
        auto for auto, names in AUTO_CLASS_MAPPING_NAMES.items() if names.get(model_type) == stock_model_cls.__name__
    ]


def make_pruned_classes(config_name: str, model_name: str) -> tuple[type, type]:
    """The (config, causal-LM) pair that extends the stock ``transformers.<config_name>`` / ``<model_name>``;
    created once, then returned from the module namespace (auto_map resolves the same names)."""
    stock_config = getattr(transformers, config_name)
    stock_model = getattr(transformers, model_name)
    # A model class serves other config classes too (Sarvam-MLA's config builds DeepseekV3ForCausalLM): the pruned
    # model class is then named after both, so each config keeps its own pruned pair and auto_map entry.
    own_config = stock_model.config_class is stock_config
    if not own_config and MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(stock_config.model_type) != model_name:
        raise ValueError(
            f"{model_name}.config_class is {stock_model.config_class.__name__}, and transformers does not map "
            f"{config_name} (model_type {stock_config.model_type!r}) to {model_name} either"
        )
    pruned_config_name = CLASS_PREFIX + config_name
    pruned_model_name = CLASS_PREFIX + model_name + ("" if own_config else CONFIG_SEPARATOR + config_name)
    if pruned_model_name in globals():
        return globals()[pruned_config_name], globals()[pruned_model_name]
    pruned_config = globals().get(pruned_config_name) or type(
        pruned_config_name,
        (stock_config,),
        {
            "model_type": MODEL_TYPE_PREFIX + stock_config.model_type,
            "__module__": __name__,
            "__doc__": f"{config_name} whose MoE layers keep per-layer expert counts (hf_moeprune).",
        },
    )
    pruned_model = type(
        pruned_model_name,
        (PrunedMoEMixin, stock_model),
        {
            "config_class": pruned_config,
            "__init__": _make_init(stock_model),
            "forward": _forward_with_stock_signature(stock_model),
            "__module__": __name__,
            "__doc__": f"{model_name} whose MoE layers keep per-layer expert counts (hf_moeprune).",
            "stock_config_class": stock_config,
            "stock_model_class": stock_model,
        },
    )
    # transformers decides whether attention/experts kernels can be swapped (grouped_mm, sdpa, ...) by
    # reading the source of the class's module; this file reuses the stock modules, so inherit their answer.
    for probe in ("_can_set_attn_implementation", "_can_set_experts_implementation"):
        if hasattr(stock_model, probe):
            setattr(pruned_model, f"{probe}_cached_value", bool(getattr(stock_model, probe)()))
    globals()[pruned_config_name], globals()[pruned_model_name] = pruned_config, pruned_model
    PRUNED_CLASSES[stock_config.model_type] = (pruned_config, pruned_model)
    return pruned_config, pruned_model


def __getattr__(name: str):
    # trust_remote_code resolves auto_map entries ("modeling_moeprune.MoEPruneMixtralForCausalLM") by name.
    stock_name = name[len(CLASS_PREFIX) :] if name.startswith(CLASS_PREFIX) else None
    config_name = None
    if stock_name and CONFIG_SEPARATOR in stock_name:  # MoEPrune<Model>__<Config>, see make_pruned_classes
        stock_name, config_name = stock_name.split(CONFIG_SEPARATOR, 1)
    stock = getattr(transformers, stock_name, None) if stock_name else None
    if isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel):
        return make_pruned_classes(config_name or stock.config_class.__name__, stock_name)[1]
    if isinstance(stock, type) and issubclass(stock, transformers.PreTrainedConfig):
        config_cls = type(
            name,
            (stock,),
            {"model_type": MODEL_TYPE_PREFIX + stock.model_type, "__module__": __name__, "__doc__": stock.__doc__},
        )
        globals()[name] = config_cls
        return config_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
