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

from hf_moeprune.adapters.base import (
    COUNT_FIELD_CANDIDATES,
    RULE_SCORE_FUNCTION,
    TOP_K_FIELD_CANDIDATES,
    KeepAllExperts,
    MoEAdapter,
)
from hf_moeprune.format.modeling_moeprune import (
    DEFAULT_ROUTER_OUTPUT,
    ROUTE_FUNCTIONS,
    ROUTER_OUTPUTS,
    ROUTES_READING_INPUTS,
)

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
# Config fields counting router rows after the routed experts (LongCat-Flash's zero-computation experts, Inkling's
# shared experts); the router or the MoE block keeps the count under the same name.
EXTRA_ROW_FIELD_CANDIDATES = ("zero_expert_num", "n_shared_experts")
# Config fields counting decoder layers where num_hidden_layers counts something else (LongCat: attention sublayers)
LAYER_COUNT_FIELD_CANDIDATES = ("num_layers",)
# Rules that route group-limited on the router's ``num_group`` / ``topk_group`` (Mistral-4: softmax_group_limited)
GROUP_RULES = ("sigmoid_group_limited", "softmax_group_limited")


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


def _extra_rows_field(block: nn.Module, router: nn.Module, extra: int) -> str | None:
    """The name under which the router or the block keeps ``extra`` (> 0) rows after the routed experts, if any."""
    for name in EXTRA_ROW_FIELD_CANDIDATES:
        if any(getattr(module, name, None) == extra for module in (router, block)):
            return name
    return None


def _find_block(layer: nn.Module, hidden_size: int) -> tuple[str, str, str, nn.Module] | None:
    """(block attribute, router attribute, router weight path, experts module) of a decoder layer, or None. The block
    attribute is "" when the layer itself holds router and experts (Gemma-4). The router reads the experts' input width
    or the decoder's ``hidden_size`` (Muse-Spark's experts run at a pooled width of their own). Its weight may have
    extra rows after the routed experts where router or block name their count (`EXTRA_ROW_FIELD_CANDIDATES`)."""
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
                if param.dim() != 2 or param.shape[1] not in (*hidden, hidden_size):
                    continue
                extra = param.shape[0] - num_experts
                if extra == 0 or (extra > 0 and _extra_rows_field(block, router, extra) is not None):
                    return block_attr, router_attr, name, experts
    return None


def _config_field(config, candidates: tuple[str, ...], value) -> str | None:
    declared = config.to_dict()
    return next((name for name in candidates if declared.get(name) == value), None)


def router_output_convention(output) -> str | None:
    """The ``ROUTER_OUTPUTS`` convention a router's output follows, read off its shape, or None."""
    if not (isinstance(output, tuple) and all(isinstance(t, torch.Tensor) for t in output)):
        return None
    # (logits, weights, indices) plus, for some routers, outputs that follow the choice (Inkling's shared weights)
    if len(output) >= 3 and not output[2].is_floating_point() and output[1].shape == output[2].shape:
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


def _probe_hidden(router: nn.Module, hidden_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(64, hidden_size, generator=generator).to(next(router.parameters()).dtype)


def _probe_router(router: nn.Module, hidden_size: int, seed: int, router_args: tuple):
    hidden = _probe_hidden(router, hidden_size, seed)
    with torch.no_grad():
        try:
            return call_router(router, hidden, *router_args)
        except TypeError as exc:  # a router that needs more than the hidden states (a bias owned by the block)
            raise DiscoveryError(f"{type(router).__name__} is not called as router(hidden_states): {exc}") from None


def identify_routing(router: nn.Module, hidden_size: int, seed: int = 0, router_args: tuple = ()) -> list[str]:
    """Every rule in ``ROUTE_FUNCTIONS`` that reproduces ``router`` bit for bit on random inputs, preferred first:
    its (weights, indices), and the router's whole output once written back in the router's own form
    (``ROUTER_OUTPUTS``). ``router_args``: what the MoE block passes the router besides the hidden states."""
    hidden = _probe_hidden(router, hidden_size, seed)
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
        reads_inputs = name in ROUTES_READING_INPUTS
        try:
            inputs = (hidden, *router_args) if reads_inputs else router_args
            w, i, *rest = ROUTE_FUNCTIONS[name](router, logits, None, *inputs)
        except (AttributeError, RuntimeError, TypeError, ValueError, IndexError):
            continue  # the rule reads router attributes (or inputs) this family does not have
        if not (torch.equal(i, indices) and _same(w, weights)):
            continue
        if reads_inputs:  # it returns the router's further outputs too (Inkling's shared-expert weights)
            if len(rest) == len(output) - 3 and all(map(_same, rest, output[3:])):
                matches.append(name)
            continue
        if all(torch.equal(a, b) for a, b in zip(pack(router, output, w, i), output, strict=True)):
            matches.append(name)
    return matches


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


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


def routes_from_hidden_states(router: nn.Module, hidden_size: int, router_args: tuple = ()) -> bool:
    """Whether ``router`` runs on the hidden states (and the block's own tensors) alone; DeepSeek-V4's hash routers
    also need the token ids, which pick their experts."""
    weight = next(router.parameters())
    try:
        with torch.no_grad():
            call_router(router, torch.zeros(1, hidden_size, dtype=weight.dtype, device=weight.device), *router_args)
    except TypeError:
        return False
    return True


def _keep_all_declaration(config, num_layers: int, fixed: list[int], routed: list[int], router: nn.Module):
    """The `KeepAllExperts` that names the ``fixed`` layers: the first per-layer list field of ``config`` whose entries
    at those layers differ from its entries at every ``routed`` layer."""
    for name, entries in config.to_dict().items():
        if not isinstance(entries, list) or len(entries) != num_layers or not all(isinstance(e, str) for e in entries):
            continue
        values = {entries[i] for i in fixed}
        if values.isdisjoint(entries[i] for i in routed):
            tables = [n for n, t in [*router.named_buffers(), *router.named_parameters()] if not t.is_floating_point()]
            return KeepAllExperts(
                layer_types_field=name,
                values=tuple(sorted(values)),
                reason=f"its router ({type(router).__name__}) does not choose experts from the hidden states alone",
                tables=tuple(tables),
            )
    raise DiscoveryError(
        f"{config.model_type}: the routers of MoE layers {fixed} ({type(router).__name__}) need more than the hidden "
        f"states, and no per-layer list of the config tells those layers apart from {routed}"
    )


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
    from hf_moeprune.adapters.base import AUTO_CLASS_MAPPINGS, auto_class_mapping

    layers, layers_path = _decoder_layers(model)
    config = model.config
    # the Auto class whose mapping gives this model's class; a text-only model may be reachable only through
    # AutoModelForImageTextToText (Mistral-Small-4: Mistral4ForCausalLM), and a composite whose class is also its
    # causal-LM class (Gemma-4's) is the vision-language model it is
    composite_first = layers_path is not None
    preferred = sorted(AUTO_CLASS_MAPPINGS, key=lambda name: (name == "AutoModelForImageTextToText") != composite_first)
    auto_class = next(
        (name for name in preferred if auto_class_mapping(name).get(config.model_type) == type(model).__name__),
        "AutoModelForImageTextToText" if composite_first else "AutoModelForCausalLM",
    )
    composite = dict(auto_class=auto_class)
    if layers_path is not None:  # the MoE fields are in the language model's sub-config
        composite.update(text_config_attr="text_config", layers_path=layers_path)
        config = config.text_config
    found = [(idx, _find_block(layer, config.hidden_size)) for idx, layer in enumerate(layers)]
    found = [(idx, f) for idx, f in found if f is not None]
    if not found:
        raise DiscoveryError(f"{type(model).__name__}: no decoder layer has an experts module with fused 3D tensors")
    block_attr, router_attr, weight_name, _ = found[0][1]
    if {f[:3] for _, f in found} != {(block_attr, router_attr, weight_name)}:
        raise DiscoveryError(f"{type(model).__name__}: MoE layers place their router differently")

    def parts(idx: int, experts: nn.Module):
        block = getattr(layers[idx], block_attr) if block_attr else layers[idx]
        num_experts = next(p for p in experts.parameters(recurse=False) if p.dim() == 3).shape[0]
        return block, getattr(block, router_attr), num_experts, _per_expert(block, num_experts, recurse=False)

    # the rule is read off the first layer whose router chooses from the hidden states; layers whose router needs
    # more (DeepSeek-V4's token-id tables) must keep all their experts, named by a per-layer list of the config
    routed, fixed = [], []
    for idx, (_, _, _, experts) in found:
        block, router, _, block_tensors = parts(idx, experts)
        args = block_router_args(block, block_tensors)
        (routed if routes_from_hidden_states(router, config.hidden_size, args) else fixed).append(idx)
    if not routed:  # raises, naming the router and what it needs
        identify_routing(parts(found[0][0], found[0][1][3])[1], config.hidden_size)
    keep_all = None
    if fixed:
        fixed_router = parts(fixed[0], dict(found)[fixed[0]][3])[1]
        keep_all = _keep_all_declaration(config, len(layers), fixed, routed, fixed_router)
    layer_idx = routed[0]
    experts = dict(found)[layer_idx][3]
    block, router, num_experts, block_tensors = parts(layer_idx, experts)
    extra = router.get_parameter(weight_name).shape[0] - num_experts
    extra_rows = {}
    if extra:
        field = _extra_rows_field(block, router, extra)
        if getattr(config, field, None) != extra:
            raise DiscoveryError(
                f"{config.model_type}: the router has {extra} rows after the {num_experts} experts, but config.{field} "
                f"is {getattr(config, field, None)!r}"
            )
        extra_rows = dict(
            extra_rows_field=field,
            extra_row_tensors=tuple(_per_expert(router, num_experts + extra)),
            routed_count_attributes=_count_attributes(block, num_experts, exclude=("num_experts",)),
            total_count_attributes=_count_attributes(block, num_experts + extra),
        )
    router_tensors = [weight_name] + [
        n for n in (*_per_expert(router, num_experts), *extra_rows.get("extra_row_tensors", ())) if n != weight_name
    ]
    # with the experts' own submodules: Ergo keeps a per-expert RMSNorm scale in experts.post_expert_norm
    expert_tensors = _per_expert(experts, num_experts)
    count_field = _config_field(config, COUNT_FIELD_CANDIDATES, num_experts)
    top_k_field = _config_field(config, TOP_K_FIELD_CANDIDATES, router_top_k(router, config.hidden_size))
    if count_field is None or top_k_field is None:
        raise DiscoveryError(
            f"{config.model_type}: no config field among {COUNT_FIELD_CANDIDATES} equals {num_experts} experts or "
            f"none among {TOP_K_FIELD_CANDIDATES} equals the router's top_k"
        )
    if getattr(config, "num_hidden_layers", len(layers)) != len(layers):  # LongCat: two sublayers per decoder layer
        field = _config_field(config, LAYER_COUNT_FIELD_CANDIDATES, len(layers))
        if field is None:
            raise DiscoveryError(
                f"{config.model_type}: {len(layers)} decoder layers but num_hidden_layers={config.num_hidden_layers} "
                f"and none of {LAYER_COUNT_FIELD_CANDIDATES} counts them"
            )
        extra_rows["layers_field"] = field
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
    if routing in GROUP_RULES:
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
        keep_all_experts=keep_all,
        router_output=router_output,
        experts_call=experts_call_convention(experts),
        **groups,
        **composite,
        **extra_rows,
    )


def _count_attributes(block: nn.Module, count: int, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Integer attributes of the block and its router-like children whose name mentions experts and whose value is
    ``count`` (relative to the block): the counts a family caches, which surgery must follow. Only looked for where
    extra router rows make the routed count and the router's width differ (LongCat's ``num_routed_experts``)."""
    found = []
    for path, module in [("", block), *((n, m) for n, m in block.named_children() if n != "experts")]:
        for name, value in vars(module).items():
            if type(value) is int and value == count and "expert" in name and name not in exclude:
                found.append(f"{path}.{name}" if path else name)
    return tuple(found)
