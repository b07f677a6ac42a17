"""Derive a family's adapter from what a transformers v5 MoE model exposes.

transformers v5 gives MoE blocks one shape: an experts module holding fused 3D tensors with the expert on
dim 0 (called as ``experts(hidden_states, top_k_index, top_k_weights)``) next to a router module holding a
``[num_experts, hidden]`` weight, optionally a bias and an ``e_score_correction_bias``. `discover_adapter`
reads that layout off a model and identifies the routing rule by running the stock router and every rule of
``ROUTE_FUNCTIONS`` on the same inputs: a rule counts only when it reproduces weights and indices bit for bit.

It serves two purposes: a model of a family nobody registered yet still prunes (``get_adapter`` falls back to
it, with a warning), and the family test checks every registration against what discovery finds, so a
declaration cannot drift from the modeling code it describes.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from hf_moeprune.adapters.base import COUNT_FIELD_CANDIDATES, RULE_SCORE_FUNCTION, TOP_K_FIELD_CANDIDATES, MoEAdapter
from hf_moeprune.format.modeling_moeprune import DEFAULT_ROUTER_OUTPUT, ROUTE_FUNCTIONS, ROUTER_OUTPUTS

logger = logging.getLogger(__name__)

# When several rules reproduce the router on the probe, the more general one wins: `softmax_topk` follows the
# router's norm_topk_prob switch, `softmax_topk_renorm` is the same rule with the switch always on.
RULE_PREFERENCE = (
    "softmax_topk",
    "softmax_topk_renorm",
    "topk_softmax",
    "softmax_topk_scaled",
    "sigmoid_group_limited",
    "sigmoid_group_limited_zero_fill",
    "sigmoid_group_limited_sorted",
)
GROUP_FIELD_CANDIDATES = ("n_group", "num_expert_group")


class DiscoveryError(ValueError):
    """The model does not have the v5 MoE layout, or no known routing rule reproduces its router."""


def _per_expert(module: nn.Module, num_experts: int, recurse: bool = True) -> list[str]:
    named = [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]
    # [1, experts]: a per-expert statistic kept in a group dimension (Ernie-4.5's e_score_correction_bias)
    return [
        name
        for name, t in named
        if (t.dim() >= 1 and t.shape[0] == num_experts)
        or (t.dim() == 2 and t.shape[0] == 1 and t.shape[1] == num_experts)
    ]


def _find_block(layer: nn.Module) -> tuple[str, str, str, nn.Module] | None:
    """(block attribute, router attribute, router weight path, experts module) of a decoder layer, or None. The block
    attribute is "" when the layer itself holds router and experts (Gemma-4)."""
    for block_attr, block in [("", layer), *layer.named_children()]:
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        fused = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
        if not fused:
            continue
        num_experts = fused[0].shape[0]
        hidden = fused[0].shape[1:]
        # a router module before bare projections (Gemma-4's decoder layer also holds per-layer-input Linears)
        children = sorted(block.named_children(), key=lambda child: isinstance(child[1], nn.Linear))
        for router_attr, router in children:
            if router_attr == "experts":
                continue
            for name, param in router.named_parameters():
                if param.dim() == 2 and param.shape[0] == num_experts and param.shape[1] in hidden:
                    return block_attr, router_attr, name, experts
    return None


def _config_field(config, candidates: tuple[str, ...], value) -> str | None:
    declared = config.to_dict()
    return next((name for name in candidates if declared.get(name) == value), None)


def router_output_convention(output) -> str | None:
    """The ``ROUTER_OUTPUTS`` convention a router's output follows, read off its shape, or None."""
    if not (isinstance(output, tuple) and all(isinstance(t, torch.Tensor) for t in output)):
        return None
    if len(output) == 3 and not output[2].is_floating_point() and output[1].shape == output[2].shape:
        return DEFAULT_ROUTER_OUTPUT
    if len(output) == 2 and output[0].shape == output[1].shape and output[0].is_floating_point():
        return "scores_logits"
    return None


def experts_call_convention(experts: nn.Module) -> str:
    """The ``EXPERTS_CALLS`` convention of an experts module: ``"dense_scaled_inputs"`` when its forward takes the
    hidden states alone (Llama 4), else ``"routed"`` (hidden states, top-k indices, top-k weights). Read off the
    class's forward: the statistics replace the instance's while they observe."""
    parameters = inspect.signature(type(experts).forward).parameters.values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return "dense_scaled_inputs" if len(positional) == 2 else "routed"  # self and the hidden states


def _probe_router(router: nn.Module, hidden_size: int, seed: int, router_args: tuple):
    generator = torch.Generator().manual_seed(seed)
    weight = next(router.parameters())
    hidden = torch.randn(64, hidden_size, generator=generator).to(weight.dtype)
    with torch.no_grad():
        try:
            return call_router(router, hidden, *router_args)
        except TypeError as exc:  # a router that needs more than the hidden states (a bias owned by the block)
            raise DiscoveryError(f"{type(router).__name__} is not called as router(hidden_states): {exc}") from None


def identify_routing(router: nn.Module, hidden_size: int, seed: int = 0, router_args: tuple = ()) -> list[str]:
    """Every rule in ``ROUTE_FUNCTIONS`` that reproduces ``router`` bit for bit on random inputs, preferred first:
    its (weights, indices), and the router's whole output once written back in the router's own form
    (``ROUTER_OUTPUTS``). ``router_args``: what the MoE block passes the router besides the hidden states."""
    output = _probe_router(router, hidden_size, seed, router_args)
    convention = router_output_convention(output)
    if convention is None:
        raise DiscoveryError(
            f"{type(router).__name__} returns none of the known router outputs: "
            + "; ".join(f"{name}: {c.description}" for name, c in ROUTER_OUTPUTS.items())
        )
    unpack, pack = ROUTER_OUTPUTS[convention].unpack, ROUTER_OUTPUTS[convention].pack
    logits, weights, indices = unpack(router, output)
    matches = []
    for name in sorted(ROUTE_FUNCTIONS, key=lambda n: RULE_PREFERENCE.index(n) if n in RULE_PREFERENCE else 99):
        try:
            w, i = ROUTE_FUNCTIONS[name](router, logits, None, *router_args)
        except (AttributeError, RuntimeError, TypeError):
            continue  # the rule reads router attributes this family does not have
        if not (torch.equal(i, indices) and w.dtype == weights.dtype and torch.equal(w, weights)):
            continue
        if all(torch.equal(a, b) for a, b in zip(pack(router, output, w, i), output, strict=True)):
            matches.append(name)
    return matches


def call_router(router: nn.Module, hidden: torch.Tensor, *router_args):
    """``router(hidden [tokens, hidden], *router_args)``; a router that unpacks [batch, seq, hidden] (AFMoE) gets the
    tokens as one sequence. Its outputs are per token either way."""
    try:
        return router(hidden, *router_args)
    except ValueError:  # "not enough values to unpack": the router reads batch, seq, hidden off the shape
        return router(hidden.unsqueeze(0), *router_args)


def router_top_k(router: nn.Module, hidden_size: int) -> int | None:
    """The router's experts per token: its ``top_k`` attribute, else (Gemma-4 reads it from its config) the width of
    the indices it returns."""
    if hasattr(router, "top_k"):
        return router.top_k
    weight = next(router.parameters())
    with torch.no_grad():
        output = call_router(router, torch.zeros(1, hidden_size, dtype=weight.dtype, device=weight.device))
    convention = router_output_convention(output)
    return None if convention is None else ROUTER_OUTPUTS[convention].unpack(router, output)[2].shape[-1]


def block_router_args(block: nn.Module, block_tensors) -> tuple:
    """The per-expert tensors a MoE block holds itself; such blocks pass them to their router after the hidden
    states (MiniMax-M2, HY-V3: ``e_score_correction_bias``; LFM2-MoE: ``expert_bias``)."""
    return tuple(getattr(block, name) for name in block_tensors)


# Where vision-language models keep their language model's decoder layers (transformers v5 composite models).
COMPOSITE_LAYER_PATHS = ("model.language_model.layers", "language_model.model.layers")  # the second: Llama 4


def _decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str | None]:
    """The decoder layers and, for a composite (vision-language) model, their path from the model."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is not None:
        return layers, None
    for path in COMPOSITE_LAYER_PATHS:
        try:
            return model.get_submodule(path), path
        except AttributeError:
            continue
    raise DiscoveryError(f"{type(model).__name__} has no model.layers (nor any of {COMPOSITE_LAYER_PATHS})")


def discover_adapter(model: nn.Module) -> MoEAdapter:
    """An adapter for ``model`` derived from its modules; `DiscoveryError` says what does not fit."""
    layers, layers_path = _decoder_layers(model)
    composite = {}
    config = model.config
    if layers_path is not None:  # the MoE fields are in the language model's sub-config
        from hf_moeprune.adapters.base import AUTO_CLASS_MAPPINGS, auto_class_mapping

        auto_class = next(
            (
                name
                for name in AUTO_CLASS_MAPPINGS
                if auto_class_mapping(name).get(config.model_type) == type(model).__name__
            ),
            "AutoModelForImageTextToText",
        )
        composite = dict(text_config_attr="text_config", layers_path=layers_path, auto_class=auto_class)
        config = config.text_config
    found = [(idx, _find_block(layer)) for idx, layer in enumerate(layers)]
    found = [(idx, f) for idx, f in found if f is not None]
    if not found:
        raise DiscoveryError(f"{type(model).__name__}: no decoder layer has an experts module with fused 3D tensors")
    layer_idx, (block_attr, router_attr, weight_name, experts) = found[0]
    if {f[:3] for _, f in found} != {(block_attr, router_attr, weight_name)}:
        raise DiscoveryError(f"{type(model).__name__}: MoE layers place their router differently")
    block = getattr(layers[layer_idx], block_attr) if block_attr else layers[layer_idx]
    router = getattr(block, router_attr)
    num_experts = next(p for p in experts.parameters(recurse=False) if p.dim() == 3).shape[0]
    router_tensors = [weight_name] + [n for n in _per_expert(router, num_experts) if n != weight_name]
    expert_tensors = _per_expert(experts, num_experts, recurse=False)
    block_tensors = _per_expert(block, num_experts, recurse=False)
    count_field = _config_field(config, COUNT_FIELD_CANDIDATES, num_experts)
    top_k_field = _config_field(config, TOP_K_FIELD_CANDIDATES, router_top_k(router, config.hidden_size))
    if count_field is None or top_k_field is None:
        raise DiscoveryError(
            f"{config.model_type}: no config field among {COUNT_FIELD_CANDIDATES} equals {num_experts} experts or "
            f"none among {TOP_K_FIELD_CANDIDATES} equals the router's top_k"
        )
    rules = identify_routing(router, config.hidden_size, router_args=block_router_args(block, block_tensors))
    if not rules:
        raise DiscoveryError(
            f"{config.model_type}: no rule in {sorted(ROUTE_FUNCTIONS)} reproduces {type(router).__name__}"
        )
    routing = rules[0]
    router_output = router_output_convention(
        _probe_router(router, config.hidden_size, 0, block_router_args(block, block_tensors))
    )
    groups = {}
    if routing == "sigmoid_group_limited":
        group_field = _config_field(config, GROUP_FIELD_CANDIDATES, getattr(router, "num_group", None))
        groups = dict(group_field=group_field or "n_group", topk_group_field="topk_group")
    return MoEAdapter(
        model_type=model.config.model_type,
        num_experts_field=count_field,
        top_k_field=top_k_field,
        block_attr=block_attr,
        router_attr=router_attr,
        router_tensors=tuple(router_tensors),
        expert_tensors=tuple(expert_tensors),
        block_tensors=tuple(block_tensors),
        score_function=RULE_SCORE_FUNCTION.get(routing, "softmax"),
        routing=routing,
        config_class=type(model.config).__name__,
        model_class=type(model).__name__,
        router_output=router_output,
        experts_call=experts_call_convention(experts),
        **groups,
        **composite,
    )
