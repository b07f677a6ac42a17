"""Architecture adapters: where each MoE family keeps its router and experts, and how it routes.

An adapter is a small declarative record. Surgery, statistics and balancing only talk to the model
through it, so adding a family is one `register_family(...)` call in `families.py`: the record owns the
routing rule, the config fields of the pruned format, the stock classes the pruned classes extend, the
tensors kept out of quantization and the tiny config the tests build. Whatever transformers' v5 MoE
layout implies (``mlp.gate`` / ``mlp.experts``, fused ``gate_up_proj``/``down_proj``, the count and top-k
fields, the stock classes) is the default or derived, so a declaration names only what differs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_moeprune.adapters.routing import BUILTIN_ROUTE_FUNCTIONS, get_route_function
from hf_moeprune.format import register_pruned_classes
from hf_moeprune.format.layout import base_model_type
from hf_moeprune.format.modeling_moeprune import (
    AUTO_CLASS_MAPPING_NAMES,
    COUNT_FIELD_CANDIDATES,
    DEFAULT_ROUTER_OUTPUT,
    ROUTER_OUTPUTS,
    SELECTION_BIAS,
    get_submodule_attr,
    make_pruned_classes,
    reroute,
)

logger = logging.getLogger(__name__)

TOP_K_FIELD_CANDIDATES = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k_experts")

# Whether a routing rule renormalises the combine weights over the chosen experts (per-expert scores count
# as renormalised: no shared denominator), so that removing an expert no token chose changes nothing.
# ``softmax_topk`` follows the router's ``norm_topk_prob``; None means "read the config".
RULE_RENORMALIZES: dict[str, bool | None] = {
    "softmax_topk_renorm": True,
    "softmax_topk": None,
    "topk_softmax": True,
    "sigmoid_group_limited": True,
    "softmax_topk_scaled": False,
    "softmax_topk_renorm_biased": True,
    "sigmoid_topk_block_bias": True,
    "sigmoid_topk_expert_bias": None,
    "sigmoid_group_limited_sorted": True,
    "sigmoid_group_limited_zero_fill": True,
    "sigmoid_topk": True,
    "sigmoid_topk_unsorted": True,
    "sigmoid_topk_unsorted_scaled": True,
    "sigmoid_topk_block_bias_sorted": True,
    # the weights are softmaxes over the experts near the pick, so removing one of them changes the weights
    "sparsemixer_eval": False,
    "score_fn_topk": True,  # per-expert scores (sigmoid, sqrtsoftplus): no shared denominator
    "logit_topk_sigmoid": True,
    "logit_topk_sigmoid_unnormalized": True,  # per-expert sigmoid of the chosen logit (Llama 4)
    "softmax_topk_renorm_expert_scale": True,
    # the softmax runs over every routed (and zero-computation) expert and is never renormalised (LongCat-Flash)
    "softmax_topk_biased_scaled": False,
    # per-expert sigmoids normalised over the chosen and the shared experts (Inkling): an unchosen expert adds nothing
    "logsigmoid_topk_shared": True,
    "softmax_group_limited": None,
}
# What the router's first output is turned into per-expert scores with, per rule (statistics, balancing losses).
# Gemma-4's router returns probabilities already, not logits.
RULE_SCORE_FUNCTION: dict[str, str] = {
    **{rule: "sigmoid" for rule in RULE_RENORMALIZES if "sigmoid" in rule},
    "softmax_topk_renorm_expert_scale": "probabilities",
}

ROUTER_SCORE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits: torch.softmax(logits.float(), dim=-1),
    "sigmoid": lambda logits: torch.sigmoid(logits.float()),
    "probabilities": lambda probs: probs.float(),
}


@dataclass(frozen=True)
class KeepAllExperts:
    """MoE layers that must keep every expert, in checkpoint order, named by a per-layer list of the config.

    Such a layer does not choose its experts from the hidden states alone: DeepSeek-V4's ``hash_moe`` layers look
    the experts of each token up in a token-id -> expert-id table (``tid2eid``), so removing or reordering an expert
    would send tokens to other experts. Plans never touch these layers; statistics are still recorded there.

    Attributes:
        layer_types_field: config field holding one entry per decoder layer (``"mlp_layer_types"``).
        values: entries of that list whose layers keep all their experts (``("hash_moe",)``).
        reason: why, for error messages and the README table.
        tables: router tensors (relative to the router) holding expert ids rather than per-expert rows
            (``("tid2eid",)``); surgery leaves them as they are, the tiny test models fill them with random ids.
    """

    layer_types_field: str
    values: tuple[str, ...]
    reason: str
    tables: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.layer_types_field, str) or not self.layer_types_field:
            raise ValueError(f"layer_types_field={self.layer_types_field!r} must name a config field")
        if (
            not isinstance(self.values, tuple)
            or not self.values
            or not all(isinstance(v, str) and v for v in self.values)
        ):
            raise ValueError(f"values={self.values!r} must be a non-empty tuple of layer-type names")
        if not isinstance(self.reason, str) or not self.reason:
            raise ValueError(f"{self.layer_types_field}: a KeepAllExperts declaration needs a reason")
        if not isinstance(self.tables, tuple) or not all(isinstance(t, str) and t for t in self.tables):
            raise ValueError(f"tables={self.tables!r} must be a tuple of tensor names relative to the router")

    def layers(self, config) -> frozenset[int]:
        """Indices of the decoder layers whose ``layer_types_field`` entry is one of ``values``; ``config`` is the
        config holding the field (or a parsed ``config.json``)."""
        get = config.get if isinstance(config, Mapping) else lambda name: getattr(config, name, None)
        entries = get(self.layer_types_field)
        if not isinstance(entries, (list, tuple)):
            raise ValueError(
                f"config field {self.layer_types_field!r} is {entries!r}; the layers that must keep all their "
                f"experts are read from it, so it must be a list with one entry per decoder layer"
            )
        return frozenset(i for i, entry in enumerate(entries) if entry in self.values)

    def describe(self, config, layer: int) -> str:
        """Why ``layer`` keeps all its experts, naming the config entry."""
        get = config.get if isinstance(config, Mapping) else lambda name: getattr(config, name, None)
        return f"{self.layer_types_field}[{layer}] is {get(self.layer_types_field)[layer]!r}: {self.reason}"


# How the MoE block calls its experts module; the statistics wrap the call to read each routed pair's expert output.
EXPERTS_CALLS: dict[str, str] = {
    "routed": "experts(hidden_states [tokens, hidden], top_k_index, top_k_weights): transformers v5's experts modules",
    "dense_scaled_inputs": (
        "experts(routed_in [experts * tokens, hidden]): every expert runs on every token, whose input is first "
        "multiplied by the expert's score (0 for the unchosen ones) (Llama 4)"
    ),
}


def join_path(*parts: str) -> str:
    """A dotted module path from its parts, skipping empty ones (``block_attr=""``: the decoder layer itself holds the
    router and the experts, as in Gemma-4)."""
    return ".".join(part for part in parts if part)


@dataclass(frozen=True)
class MoEAdapter:
    """Describes one MoE family of transformers v5.

    Attributes:
        model_type: the stock ``config.model_type``.
        num_experts_field: config field holding the routed-expert count (default: the first of
            ``COUNT_FIELD_CANDIDATES`` that the config class declares).
        top_k_field: config field holding the experts per token (default: the first of ``TOP_K_FIELD_CANDIDATES``).
        config_class / model_class: names of the stock classes in ``transformers`` (default: transformers' own
            Auto mappings for ``model_type``); the pruned classes extend them.
        block_tensors: per-expert tensors held by the MoE block itself (MiniMax-M2 keeps its correction bias there).
        tiny_config: keyword arguments of the stock config class for a tiny test model of the family.
        skip_quantization: tensor names (relative to the decoder layer) that quantization must leave in high
            precision besides the router (e.g. Qwen2-MoE's ``shared_expert_gate``); checked against
            ``quantization.config.DEFAULT_SKIP_PATTERNS`` at registration.
        block_attr / router_attr / experts_attr: attribute path decoder layer -> MoE block -> router/experts
            (``block_attr=""``: the decoder layer is the MoE block, Gemma-4).
        router_tensors / expert_tensors: per-expert tensors (expert index on dim 0) of router and experts,
            relative to the router / experts module and possibly dotted (HunYuan: ``"wg.weight"``); the first
            router tensor is the router's weight ``[experts, hidden]``.
        score_function: how the router's first output becomes per-expert scores (``softmax``, ``sigmoid``, or
            ``probabilities`` when the router returns them: Gemma-4).
        routing: name of the family's routing rule in ``adapters.routing.ROUTE_FUNCTIONS``.
        renormalizes: ``config -> bool``; True when the combine weights are renormalised over the chosen
            top-k (or the score is per-expert), so removing an expert no token chose leaves outputs unchanged.
        group_field / topk_group_field: config fields of group-limited routing (DeepSeek-V3), or None.
        group_limited: ``config -> bool``; whether the config routes group-limited at all (DeepSeek-V2 only does
            with ``topk_method="group_limited_greedy"``; its greedy configs ignore ``n_group``).
        group_score_experts: how many of a group's best experts its group score is made of (DeepSeek-V3 sums
            the top 2, DeepSeek-V2 takes the maximum), so surgery keeps at least that many per group.
        text_config_attr: for a composite (vision-language) config, the sub-config holding the language model's
            MoE fields (``"text_config"``); the count/top-k/group fields are read there. None: the config itself.
        layers_path: path from the model to its MoE decoder layers (``"model.language_model.layers"`` in the
            vision-language families); None means ``model.layers`` (or ``layers`` on a bare backbone).
        auto_class: the Auto class that loads the family (``AutoModelForCausalLM``, or
            ``AutoModelForImageTextToText`` for the vision-language families); the stock model class is read
            from its mapping and the saved ``auto_map`` names it.
        keep_all_experts: the MoE layers that must keep all their experts (`KeepAllExperts`; DeepSeek-V4's
            ``hash_moe`` layers), or None. Every plan maker leaves them whole and ``prune_experts`` refuses a plan
            that changes them; `prunable_layer_indices` lists the other MoE layers.
        extra_rows_field: config field giving how many router rows follow the routed experts' rows and are not
            routed experts (LongCat-Flash's ``zero_expert_num`` identity experts, Inkling's ``n_shared_experts``);
            the router or the MoE block holds the same count under the same attribute name. Pruning keeps those
            rows at the end, unpruned and in order; statistics count routed experts only (a route to an index
            ``>= `` the routed count is not a routed expert). None: the router's rows are the routed experts.
        extra_row_tensors: the router tensors (of ``router_tensors``) that hold the extra rows after the routed
            ones (LongCat: the classifier weight and the correction bias; Inkling: the weight only).
        routed_count_attributes: attributes (relative to the MoE block) that cache the routed count besides
            ``num_experts`` and must follow surgery (LongCat's ``num_routed_experts``, which its index arithmetic
            ``n_routed_experts + j`` for the j-th zero expert reads).
        total_count_attributes: attributes (relative to the MoE block) that cache routed + extra rows
            (LongCat's ``router.n_routed_experts``); surgery sets them to the kept count + the extra rows.
        layers_field: config field holding the number of decoder layers (LongCat: ``num_layers``; its
            ``num_hidden_layers`` counts two attention sublayers per decoder layer).
        router_output: what the router returns, a key of ``ROUTER_OUTPUTS`` (``"logits_weights_indices"``, or
            Llama 4's ``"scores_logits"``: the chosen experts' weights scattered over all experts, and the logits).
        experts_call: how the MoE block calls its experts module, a key of ``EXPERTS_CALLS`` (``"routed"``, or
            Llama 4's ``"dense_scaled_inputs"``).
    """

    model_type: str
    num_experts_field: str | None = None
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    router_tensors: tuple[str, ...] = ("weight",)
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")
    score_function: str = "softmax"
    renormalizes: Callable[[object], bool] | None = None
    group_field: str | None = None
    topk_group_field: str | None = None
    group_limited: Callable[[object], bool] = field(default=lambda config: True)
    group_score_experts: int = 2
    top_k_field: str | None = None
    routing: str = "softmax_topk_renorm"
    config_class: str | None = None
    model_class: str | None = None
    block_tensors: tuple[str, ...] = ()
    tiny_config: Mapping[str, Any] = field(default_factory=dict)
    skip_quantization: tuple[str, ...] = ()
    text_config_attr: str | None = None
    layers_path: str | None = None
    auto_class: str = "AutoModelForCausalLM"
    keep_all_experts: KeepAllExperts | None = None
    extra_rows_field: str | None = None
    extra_row_tensors: tuple[str, ...] = ()
    routed_count_attributes: tuple[str, ...] = ()
    total_count_attributes: tuple[str, ...] = ()
    layers_field: str = "num_hidden_layers"
    router_output: str = DEFAULT_ROUTER_OUTPUT
    experts_call: str = "routed"

    def __post_init__(self):
        if self.router_output not in ROUTER_OUTPUTS:
            raise ValueError(
                f"router_output={self.router_output!r} for {self.model_type!r}; known: {sorted(ROUTER_OUTPUTS)}"
            )
        if self.experts_call not in EXPERTS_CALLS:
            raise ValueError(
                f"experts_call={self.experts_call!r} for {self.model_type!r}; known: {sorted(EXPERTS_CALLS)}"
            )
        if self.keep_all_experts is not None and not isinstance(self.keep_all_experts, KeepAllExperts):
            raise TypeError(
                f"keep_all_experts for {self.model_type!r} must be a KeepAllExperts, got "
                f"{type(self.keep_all_experts).__name__}"
            )
        if (self.extra_rows_field is None) != (not self.extra_row_tensors):
            raise ValueError(
                f"{self.model_type!r}: extra_rows_field={self.extra_rows_field!r} and extra_row_tensors="
                f"{self.extra_row_tensors!r} go together (a config field counting the extra router rows, and the "
                f"router tensors holding them)"
            )
        stray = [name for name in self.extra_row_tensors if name not in self.router_tensors]
        if stray:
            raise ValueError(
                f"{self.model_type!r}: extra_row_tensors {stray} are not router tensors; router_tensors="
                f"{self.router_tensors}"
            )
        if self.total_count_attributes and self.extra_rows_field is None:
            raise ValueError(
                f"{self.model_type!r}: total_count_attributes={self.total_count_attributes} need extra_rows_field"
            )
        if self.score_function not in ROUTER_SCORE_FUNCTIONS:
            raise ValueError(
                f"score_function={self.score_function!r} for {self.model_type!r}; "
                f"known: {sorted(ROUTER_SCORE_FUNCTIONS)}"
            )
        get_route_function(self.routing)  # fails early, naming the known rules
        # frozen dataclass: derived defaults are filled in once, here
        if self.auto_class not in AUTO_CLASS_MAPPINGS:
            raise ValueError(
                f"auto_class={self.auto_class!r} for {self.model_type!r}; known: {sorted(AUTO_CLASS_MAPPINGS)}"
            )
        if not family_installed(self.model_type):
            return  # a family newer than this transformers: register_family records it in NOT_INSTALLED
        if self.config_class is None or self.model_class is None:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

            models = auto_class_mapping(self.auto_class)
            if self.model_type not in CONFIG_MAPPING_NAMES or self.model_type not in models:
                raise ValueError(
                    f"model_type {self.model_type!r} has no {self.auto_class} class in this transformers; "
                    f"pass config_class= and model_class= explicitly"
                )
            object.__setattr__(self, "config_class", self.config_class or CONFIG_MAPPING_NAMES[self.model_type])
            object.__setattr__(self, "model_class", self.model_class or models[self.model_type])
        if self.num_experts_field is None:
            object.__setattr__(self, "num_experts_field", self._declared_field(COUNT_FIELD_CANDIDATES))
        if self.top_k_field is None:
            object.__setattr__(self, "top_k_field", self._declared_field(TOP_K_FIELD_CANDIDATES))
        if self.renormalizes is None:
            fixed = RULE_RENORMALIZES.get(self.routing)
            rule = (
                (lambda config: fixed)
                if fixed is not None
                else (lambda config: bool(getattr(config, "norm_topk_prob", False)))
            )
            object.__setattr__(self, "renormalizes", rule)

    def _declared_field(self, candidates: tuple[str, ...]) -> str:
        """The first of ``candidates`` that the stock config class declares as a field (not an alias)."""
        import transformers

        config_cls = getattr(transformers, self.config_class)
        if self.text_config_attr is not None:  # the language model's MoE fields live in a sub-config
            config_cls = config_cls.sub_configs[self.text_config_attr]
        try:  # what a saved config.json holds; some dataclass fields are aliases that never reach it (Mellum)
            declared = set(config_cls().to_dict())
        except Exception:  # a config class whose defaults do not validate on their own
            declared = (
                {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
            )
        for name in candidates:
            if name in declared:
                return name
        raise ValueError(f"{self.config_class} declares none of {candidates}; name the field in the adapter")

    # -- where things live -------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        if self.layers_path is None:
            base = getattr(model, "model", model)
            return base.layers
        try:
            return model.get_submodule(self.layers_path)
        except AttributeError:  # the backbone without the head (``model.model``)
            return model.get_submodule(self.layers_path.partition(".")[2])

    def moe_config(self, config):
        """The config holding the MoE fields: ``config`` itself, or a composite config's language-model sub-config
        (``config`` may already be that sub-config, or a parsed ``config.json``)."""
        if self.text_config_attr is None:
            return config
        get = config.get if isinstance(config, Mapping) else lambda name: getattr(config, name, None)
        sub = get(self.text_config_attr)
        return config if sub is None else sub

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        block = getattr(layer, self.block_attr, None) if self.block_attr else layer
        if block is None:
            return None
        if hasattr(block, self.router_attr) and hasattr(block, self.experts_attr):
            return block
        return None

    def router(self, layer: nn.Module) -> nn.Module:
        return getattr(self.moe_block(layer), self.router_attr)

    def experts(self, layer: nn.Module) -> nn.Module:
        return getattr(self.moe_block(layer), self.experts_attr)

    def moe_layer_indices(self, model: nn.Module) -> list[int]:
        return [i for i, layer in enumerate(self.decoder_layers(model)) if self.moe_block(layer) is not None]

    def keep_all_layers(self, config) -> frozenset[int]:
        """Decoder layers that must keep all their experts (empty unless the family declares `KeepAllExperts`)."""
        if self.keep_all_experts is None:
            return frozenset()
        return self.keep_all_experts.layers(self.moe_config(config))

    def prunable_layer_indices(self, model: nn.Module) -> list[int]:
        """The MoE layers whose experts plans may remove or reorder: `moe_layer_indices` minus `keep_all_layers`."""
        fixed = self.keep_all_layers(model.config)
        return [i for i in self.moe_layer_indices(model) if i not in fixed]

    def num_experts(self, layer: nn.Module) -> int:
        """The layer's routed experts: the router's rows less the extra rows that follow them."""
        owner, attr = get_submodule_attr(self.router(layer), self.router_tensors[0])
        return getattr(owner, attr).shape[0] - self.extra_rows(layer)

    def extra_rows(self, layer: nn.Module) -> int:
        """Router rows after the routed experts' (0 unless ``extra_rows_field``), as the router or the MoE block
        caches the config field under its own name."""
        if self.extra_rows_field is None:
            return 0
        for module in (self.router(layer), self.moe_block(layer)):
            value = getattr(module, self.extra_rows_field, None)
            if value is not None:
                return int(value)
        raise ValueError(
            f"{self.model_type!r}: neither the router nor the MoE block has an attribute {self.extra_rows_field!r} "
            f"(the extra router rows' count)"
        )

    def extra_rows_in_config(self, config) -> int:
        """The extra router rows the config declares (``extra_rows_field``; 0 without one)."""
        if self.extra_rows_field is None:
            return 0
        return int(getattr(self.moe_config(config), self.extra_rows_field) or 0)

    def top_k(self, config) -> int:
        return int(getattr(self.moe_config(config), self.top_k_field))

    def num_experts_in_config(self, config) -> int:
        """The routed-expert count the config declares (the widest layer's, once pruned)."""
        return int(getattr(self.moe_config(config), self.num_experts_field))

    @property
    def tensor_names(self) -> list[str]:
        """Per-expert tensors, relative to the decoder layer (the router's learned ``selection_bias`` buffer
        is listed too; names a layer does not have are skipped by surgery)."""
        router = [join_path(self.router_path, n) for n in (*self.router_tensors, SELECTION_BIAS)]
        experts = [join_path(self.experts_path, n) for n in self.expert_tensors]
        block = [join_path(self.block_attr, n) for n in self.block_tensors]
        return router + experts + block

    @property
    def count_attributes(self) -> list[str]:
        """Module attributes that cache the expert count and must follow surgery."""
        return [
            join_path(self.router_path, "num_experts"),
            join_path(self.experts_path, "num_experts"),
            join_path(self.block_attr, "num_experts"),
            *(join_path(self.block_attr, name) for name in self.routed_count_attributes),
        ]

    @property
    def extra_row_tensor_names(self) -> list[str]:
        """The per-expert tensors (relative to the decoder layer) whose rows continue past the routed experts."""
        return [join_path(self.router_path, n) for n in self.extra_row_tensors]

    @property
    def total_count_attribute_names(self) -> list[str]:
        """Module attributes (relative to the decoder layer) caching routed + extra rows."""
        return [join_path(self.block_attr, name) for name in self.total_count_attributes]

    @property
    def router_path(self) -> str:
        """The router's path inside a decoder layer, e.g. ``"mlp.gate"``."""
        return join_path(self.block_attr, self.router_attr)

    @property
    def experts_path(self) -> str:
        """The experts module's path inside a decoder layer, e.g. ``"mlp.experts"``."""
        return join_path(self.block_attr, self.experts_attr)

    @property
    def has_native_selection_bias(self) -> bool:
        """True when the family's router already selects on score + a per-expert bias that is saved with the
        model (DeepSeek-V3's ``e_score_correction_bias``)."""
        return "e_score_correction_bias" in self.router_tensors or "e_score_correction_bias" in self.block_tensors

    # -- routing semantics -------------------------------------------------------------------
    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        """Per-expert router scores [tokens, experts] from router logits (probabilities or sigmoids)."""
        return ROUTER_SCORE_FUNCTIONS[self.score_function](router_logits)

    def unpack_router_output(self, router: nn.Module, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, top-k weights, top-k indices) from what the family's router returned."""
        return ROUTER_OUTPUTS[self.router_output].unpack(router, output)

    def pack_router_output(self, router: nn.Module, output, weights: torch.Tensor, indices: torch.Tensor):
        """``output`` with its choice replaced by ``weights``/``indices``, in the router's own form."""
        return ROUTER_OUTPUTS[self.router_output].pack(router, output, weights, indices)

    def route(self, router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None, *router_args):
        """The family's (weights, indices) from router logits; ``selection_bias`` shifts only the choice.
        ``router_args``: the router's arguments after the hidden states (a bias the MoE block holds and passes)."""
        return get_route_function(self.routing)(router, logits, selection_bias, *router_args)

    def reroute(self, router: nn.Module, args: tuple, output: tuple, selection_bias: torch.Tensor | None) -> tuple:
        """The router's ``output`` (for inputs ``args``) with its experts chosen on score + ``selection_bias``: the
        logits as they were, the new weights and indices, and the further outputs that follow the choice."""
        return reroute(self.routing, router, args, output, selection_bias, self.router_output)

    def num_groups(self, config) -> int:
        config = self.moe_config(config)
        if self.group_field is None or not self.group_limited(config):
            return 1
        return int(getattr(config, self.group_field) or 1)

    def output_invariant_under_removal(self, config) -> bool:
        """Whether removing experts no token selects leaves logits bit-for-bit equal (see README)."""
        return bool(self.renormalizes(self.moe_config(config))) and self.num_groups(config) == 1


# Auto class name -> its model mapping (model_type -> class name); the pruned format's file owns it, since it writes
# an auto_map entry for each auto class that loads the stock class
AUTO_CLASS_MAPPINGS = AUTO_CLASS_MAPPING_NAMES


def auto_class_mapping(auto_class: str) -> Mapping[str, str]:
    """model_type -> model class name of ``auto_class`` in the installed transformers."""
    return AUTO_CLASS_MAPPINGS[auto_class]


ADAPTERS: dict[str, MoEAdapter] = {}
# model_type -> why hf_moeprune cannot prune it; get_adapter raises it, the family test lists it
UNSUPPORTED: dict[str, str] = {}
# families declared here that the installed transformers does not ship (newer than it)
NOT_INSTALLED: dict[str, MoEAdapter] = {}


def family_installed(model_type: str) -> bool:
    """Whether the installed transformers knows ``model_type`` (has its config class)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def register_family(adapter: MoEAdapter) -> MoEAdapter:
    """Register a MoE family: the one call that makes it prunable, savable, loadable and quantizable.

    Checks, before anything is filled in, that the family's routing rule ships in ``modeling_moeprune.py``
    (models saved with a selection bias apply it under ``trust_remote_code`` without hf_moeprune) and that
    quantization leaves its router in high precision; then creates and registers its pruned classes.
    """
    if adapter.model_type in ADAPTERS or adapter.model_type in UNSUPPORTED:
        raise ValueError(f"model_type {adapter.model_type!r} is already registered")
    if not family_installed(adapter.model_type):
        # transformers >= the lower bound but older than the family: importing hf_moeprune still works there, and
        # get_adapter names the family as unknown to the installed transformers
        NOT_INSTALLED[adapter.model_type] = adapter
        logger.debug("%s: not in this transformers; not registered", adapter.model_type)
        return adapter
    if adapter.routing not in BUILTIN_ROUTE_FUNCTIONS:
        raise ValueError(
            f"{adapter.model_type!r}: routing={adapter.routing!r} is not defined in format/modeling_moeprune.py, so a "
            f"model saved with it could not be loaded with trust_remote_code; add the rule there "
            f"(defined there: {sorted(BUILTIN_ROUTE_FUNCTIONS)})"
        )
    check_quantization_skips(adapter)
    check_keep_all_experts(adapter)
    register_pruned_classes(*make_pruned_classes(adapter.config_class, adapter.model_class), adapter.auto_class)
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def register_adapter(adapter: MoEAdapter) -> MoEAdapter:
    """Former name of `register_family`."""
    return register_family(adapter)


def register_unsupported(model_type: str, reason: str) -> None:
    """Record a MoE family hf_moeprune cannot prune, and why; `get_adapter` raises the reason."""
    if not reason:
        raise ValueError(f"model_type {model_type!r}: an unsupported family needs a reason")
    if model_type in ADAPTERS or model_type in UNSUPPORTED:
        raise ValueError(f"model_type {model_type!r} is already registered")
    UNSUPPORTED[model_type] = reason


def check_keep_all_experts(adapter: MoEAdapter) -> None:
    """A `KeepAllExperts` declaration must name a per-layer list field of the family's config class; with the tiny
    config it must pick layers and leave others to prune (the family tests prune those)."""
    keep_all = adapter.keep_all_experts
    if keep_all is None:
        return
    import transformers

    config_cls = getattr(transformers, adapter.config_class)
    if adapter.text_config_attr is not None:
        config_cls = config_cls.sub_configs[adapter.text_config_attr]
    declared = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    if keep_all.layer_types_field not in declared:
        raise ValueError(
            f"{adapter.model_type!r}: keep_all_experts reads {keep_all.layer_types_field!r}, which "
            f"{config_cls.__name__} does not declare"
        )
    if not adapter.tiny_config:
        return
    config = adapter.moe_config(getattr(transformers, adapter.config_class)(**adapter.tiny_config))
    fixed = keep_all.layers(config)
    layers = int(config.num_hidden_layers)
    if len(getattr(config, keep_all.layer_types_field)) != layers or not fixed or len(fixed) == layers:
        raise ValueError(
            f"{adapter.model_type!r}: with the tiny config, {keep_all.layer_types_field}="
            f"{getattr(config, keep_all.layer_types_field)!r} must have {layers} entries, some (not all) of them in "
            f"{keep_all.values}"
        )


def check_quantization_skips(adapter: MoEAdapter) -> None:
    """Routers decide which experts run; the default quantization config must keep them in high precision."""
    # imported on use: the quantization package is heavier and not needed to describe a family
    from hf_moeprune.quantization.config import DEFAULT_SKIP_PATTERNS

    names = [f"model.layers.0.{adapter.router_path}.{adapter.router_tensors[0]}"]
    names += [f"model.layers.0.{name}" for name in adapter.skip_quantization]
    for name in names:
        if not any(re.search(p, name) for p in DEFAULT_SKIP_PATTERNS):
            raise ValueError(
                f"{adapter.model_type!r}: {name} would be quantized; add a pattern for it to "
                f"quantization.config.DEFAULT_SKIP_PATTERNS"
            )


def get_adapter(model_or_config) -> MoEAdapter:
    """The adapter for a model (or config); ValueError naming the model_type if unsupported.

    A model (not a bare config) of a family nobody registered gets an adapter derived from its modules
    (`adapters.discovery`: the v5 experts/router layout, and the known rule that reproduces its router bit for bit),
    which is then registered for this process, with a warning; a model that does not fit raises why.
    """
    model = getattr(model_or_config, "module", model_or_config)  # DDP / accelerate wrappers
    config = getattr(model, "config", model)
    model_type = base_model_type(config)
    if model_type in UNSUPPORTED:
        raise ValueError(f"model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    if isinstance(model, nn.Module):
        from hf_moeprune.adapters.discovery import DiscoveryError, discover_adapter  # discovery imports this module

        try:
            adapter = discover_adapter(model)
        except DiscoveryError as exc:
            raise ValueError(
                f"model_type {model_type!r} is not a supported MoE family; supported: {sorted(ADAPTERS)} (it is not "
                f"registered and its layout could not be derived: {exc})"
            ) from None
        logger.warning(
            "model_type %r is not registered with hf_moeprune; using the adapter derived from the model (routing %r, "
            "verified bit for bit against its router on random inputs). Register it in adapters/families.py: %r",
            model_type, adapter.routing, adapter,
        )  # fmt: skip
        return register_family(adapter)
    raise ValueError(f"model_type {model_type!r} is not a supported MoE family; supported: {sorted(ADAPTERS)}")
