"""Architecture adapters: where each MoE family keeps its router and experts, and how it routes.

An adapter is a small declarative record. Surgery, statistics and balancing only talk to the model
through it, so adding a family is one `register_adapter(...)` call in `families.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_moeprune.adapters.routing import get_route_function
from hf_moeprune.format.modeling_moeprune import MODEL_TYPE_PREFIX, SELECTION_BIAS, get_submodule_attr

ROUTER_SCORE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits: torch.softmax(logits.float(), dim=-1),
    "sigmoid": lambda logits: torch.sigmoid(logits.float()),
}


@dataclass(frozen=True)
class MoEAdapter:
    """Describes one MoE family of transformers v5.

    Attributes:
        model_type: the stock ``config.model_type``.
        num_experts_field: config field holding the routed-expert count.
        block_attr / router_attr / experts_attr: attribute path decoder layer -> MoE block -> router/experts.
        router_tensors / expert_tensors: per-expert tensors (expert index on dim 0) of router and experts,
            relative to the router / experts module and possibly dotted (HunYuan: ``"wg.weight"``); the first
            router tensor is the router's weight ``[experts, hidden]``.
        score_function: how the router turns logits into per-expert scores (``softmax`` or ``sigmoid``).
        routing: name of the family's routing rule in ``adapters.routing.ROUTE_FUNCTIONS``.
        renormalizes: ``config -> bool``; True when the combine weights are renormalised over the chosen
            top-k (or the score is per-expert), so removing an expert no token chose leaves outputs unchanged.
        group_field / topk_group_field: config fields of group-limited routing (DeepSeek-V3), or None.
        group_limited: ``config -> bool``; whether the config routes group-limited at all (DeepSeek-V2 only does
            with ``topk_method="group_limited_greedy"``; its greedy configs ignore ``n_group``).
        group_score_experts: how many of a group's best experts its group score is made of (DeepSeek-V3 sums
            the top 2, DeepSeek-V2 takes the maximum), so surgery keeps at least that many per group.
    """

    model_type: str
    num_experts_field: str
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    router_tensors: tuple[str, ...] = ("weight",)
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")
    score_function: str = "softmax"
    renormalizes: Callable[[object], bool] = field(default=lambda config: True)
    group_field: str | None = None
    topk_group_field: str | None = None
    group_limited: Callable[[object], bool] = field(default=lambda config: True)
    group_score_experts: int = 2
    top_k_field: str = "num_experts_per_tok"
    routing: str = "softmax_topk_renorm"

    def __post_init__(self):
        if self.score_function not in ROUTER_SCORE_FUNCTIONS:
            raise ValueError(
                f"score_function={self.score_function!r} for {self.model_type!r}; "
                f"known: {sorted(ROUTER_SCORE_FUNCTIONS)}"
            )
        get_route_function(self.routing)  # fails early, naming the known rules

    # -- where things live -------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "model", model)
        return base.layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        block = getattr(layer, self.block_attr, None)
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
        return int(getattr(config, self.top_k_field))

    @property
    def tensor_names(self) -> list[str]:
        """Per-expert tensors, relative to the decoder layer (the router's learned ``selection_bias`` buffer
        is listed too; names a layer does not have are skipped by surgery)."""
        router = [f"{self.block_attr}.{self.router_attr}.{n}" for n in (*self.router_tensors, SELECTION_BIAS)]
        experts = [f"{self.block_attr}.{self.experts_attr}.{n}" for n in self.expert_tensors]
        return router + experts

    @property
    def count_attributes(self) -> list[str]:
        """Module attributes that cache the expert count and must follow surgery."""
        return [
            f"{self.block_attr}.{self.router_attr}.num_experts",
            f"{self.block_attr}.{self.experts_attr}.num_experts",
            f"{self.block_attr}.num_experts",
        ]

    @property
    def router_path(self) -> str:
        """The router's path inside a decoder layer, e.g. ``"mlp.gate"``."""
        return f"{self.block_attr}.{self.router_attr}"

    @property
    def has_native_selection_bias(self) -> bool:
        """True when the family's router already selects on score + a per-expert bias that is saved with the
        model (DeepSeek-V3's ``e_score_correction_bias``)."""
        return "e_score_correction_bias" in self.router_tensors

    # -- routing semantics -------------------------------------------------------------------
    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        """Per-expert router scores [tokens, experts] from router logits (probabilities or sigmoids)."""
        return ROUTER_SCORE_FUNCTIONS[self.score_function](router_logits)

    def route(self, router: nn.Module, logits: torch.Tensor, selection_bias: torch.Tensor | None = None):
        """The family's (weights, indices) from router logits; ``selection_bias`` shifts only the choice."""
        return get_route_function(self.routing)(router, logits, selection_bias)

    def num_groups(self, config) -> int:
        if self.group_field is None or not self.group_limited(config):
            return 1
        return int(getattr(config, self.group_field) or 1)

    def output_invariant_under_removal(self, config) -> bool:
        """Whether removing experts no token selects leaves logits bit-for-bit equal (see README)."""
        return bool(self.renormalizes(config)) and self.num_groups(config) == 1


ADAPTERS: dict[str, MoEAdapter] = {}


def register_adapter(adapter: MoEAdapter) -> MoEAdapter:
    if adapter.model_type in ADAPTERS:
        raise ValueError(f"an adapter for model_type {adapter.model_type!r} is already registered")
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def base_model_type(config) -> str:
    """The stock model_type of a config, looking through hf_moeprune's pruned configs."""
    model_type = getattr(config, "model_type", None)
    if model_type and model_type.startswith(MODEL_TYPE_PREFIX):
        return getattr(config, "base_model_type", None) or model_type[len(MODEL_TYPE_PREFIX) :]
    return model_type


def get_adapter(model_or_config) -> MoEAdapter:
    """The adapter for a model (or config); ValueError naming the model_type if unsupported."""
    model = getattr(model_or_config, "module", model_or_config)  # DDP / accelerate wrappers
    config = getattr(model, "config", model)
    model_type = base_model_type(config)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not a supported MoE family; supported: {sorted(ADAPTERS)}"
        ) from None
