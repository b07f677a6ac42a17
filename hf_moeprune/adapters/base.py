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
    COUNT_FIELD_CANDIDATES,
    DEFAULT_ROUTER_OUTPUT,
    ROUTER_OUTPUTS,
    SELECTION_BIAS,
    get_submodule_attr,
    make_pruned_classes,
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
    "sigmoid_topk_block_bias_sorted": True,
    # the weights are softmaxes over the experts near the pick, so removing one of them changes the weights
    "sparsemixer_eval": False,
    "score_fn_topk": True,  # per-expert scores (sigmoid, sqrtsoftplus): no shared denominator
    "logit_topk_sigmoid": True,
    "logit_topk_sigmoid_unnormalized": True,  # per-expert sigmoid of the chosen logit (Llama 4)
    "softmax_topk_renorm_expert_scale": True,
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

    def num_experts(self, layer: nn.Module) -> int:
        owner, attr = get_submodule_attr(self.router(layer), self.router_tensors[0])
        return getattr(owner, attr).shape[0]

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
        ]

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

    def num_groups(self, config) -> int:
        config = self.moe_config(config)
        if self.group_field is None or not self.group_limited(config):
            return 1
        return int(getattr(config, self.group_field) or 1)

    def output_invariant_under_removal(self, config) -> bool:
        """Whether removing experts no token selects leaves logits bit-for-bit equal (see README)."""
        return bool(self.renormalizes(self.moe_config(config))) and self.num_groups(config) == 1


# Auto class name -> the name of its model mapping in transformers.models.auto.modeling_auto
AUTO_CLASS_MAPPINGS = {
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForImageTextToText": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
}


def auto_class_mapping(auto_class: str) -> Mapping[str, str]:
    """model_type -> model class name of ``auto_class`` in the installed transformers."""
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, AUTO_CLASS_MAPPINGS[auto_class])


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
