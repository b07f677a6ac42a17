"""Expert surgery: physically remove or reorder experts of a transformers v5 MoE model, in place.

Indices in ``keep``/``order`` are the expert *positions the model has now* (for an unpruned model,
the checkpoint's expert ids). ``config.kept_expert_ids`` always tracks the original checkpoint ids.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from hf_moeprune import compat
from hf_moeprune.adapters import MoEAdapter, get_adapter
from hf_moeprune.distributed import ShardedSurgery, check_expert_parallel_count, is_sharded
from hf_moeprune.format import expert_counts, mark_pruned, record_per_layer_counts, resize_expert_tensors
from hf_moeprune.format.modeling_moeprune import get_submodule_attr, with_extra_rows
from hf_moeprune.lora import is_peft_model, peeled, slice_adapters
from hf_moeprune.quantization.quantizer import (
    check_quantized_experts,
    is_quantized_tensor,
    select_quantized_experts,
)

logger = logging.getLogger(__name__)

# Called as (old_tensor, new_tensor, index) for every per-expert tensor replaced, so that callers can
# carry optimizer state or other per-parameter data across surgery without keeping a full copy. LoRA factors
# whose experts lie along dim 1 (peft's fused-expert lora_B) are reported with a keyword ``dim=1``.
TensorReplacedHook = Callable[..., None]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP/accelerate/compile wrappers and peft's ``PeftModel``."""
    while True:
        if is_peft_model(model):
            model = model.get_base_model()
            continue
        inner = getattr(model, "module", None) or compat.compiled_inner(model)
        if inner is None:
            return model
        model = inner


def _check_layer_indices(adapter: MoEAdapter, model: nn.Module, layer_ids) -> list[int]:
    moe_layers = adapter.moe_layer_indices(model)
    bad = [layer for layer in layer_ids if layer not in moe_layers]
    if bad:
        raise ValueError(
            f"layer(s) {bad} are not MoE layers of this {adapter.model_type} model; MoE layers: {moe_layers}"
        )
    return moe_layers


DROP_GROUPS_HINT = (
    "; or drop group-limited routing for this model (prune_experts(..., drop_group_limited_routing=True), CLI "
    "--drop_group_limited_routing): every token then picks its top-k among all kept experts"
)
# Where transformers' MoE routers and blocks cache the config's group fields (DeepSeek-V3, GLM-4-MoE, dots1, ...:
# ``self.num_group = config.n_group``); the adapter's own field names are tried too.
GROUP_COUNT_ATTRIBUTES = ("num_group", "n_group", "num_expert_group")
GROUPS_PER_TOKEN_ATTRIBUTES = ("topk_group",)


def ungroup_routing(model: nn.Module) -> nn.Module:
    """Route every MoE layer of ``model`` by a plain top-k over all of its experts; in place.

    Group-limited routing (DeepSeek-V3's ``n_group``/``topk_group``) first keeps the best ``topk_group`` groups of
    contiguous experts, then picks the top-k inside them; a pruning plan that keeps different numbers of experts per
    group (or drops a group) cannot keep that structure. Setting both fields to 1 (in the config and in the routers
    that cached them) makes the one group hold every expert, which is exactly an ungrouped top-k: the model changes
    (tokens may now pick experts from groups they would have skipped) and stays a stock configuration that
    transformers, vLLM and SGLang load. A router that caches the group count under a name not known here is refused,
    naming it, before anything changes. `prune_experts(..., drop_group_limited_routing=True)` calls it.
    """
    model = unwrap_model(model)
    ungroup = _group_holders(model, get_adapter(model))
    if ungroup is not None:
        ungroup()
    return model


def _group_holders(model: nn.Module, adapter: MoEAdapter) -> Callable[[], None] | None:
    """Check that every cached copy of the group fields is known; return what sets them all to 1 (None: the model
    routes without groups already)."""
    groups = adapter.num_groups(model.config)
    if groups == 1:
        logger.info("%s routes without groups already; nothing to drop", model.config.model_type)
        return None
    count_names = {*GROUP_COUNT_ATTRIBUTES, adapter.group_field}
    per_token_names = {*GROUPS_PER_TOKEN_ATTRIBUTES, adapter.topk_group_field} - {None}
    layers = adapter.decoder_layers(model)
    modules = []
    for layer_idx in adapter.moe_layer_indices(model):
        for module in (adapter.router(layers[layer_idx]), adapter.moe_block(layers[layer_idx])):
            unknown = [
                name
                for name, value in vars(module).items()
                if "group" in name
                and name not in count_names | per_token_names
                and isinstance(value, int)
                and value == groups
            ]
            if unknown:
                raise ValueError(
                    f"layer {layer_idx}: {type(module).__name__}.{unknown[0]} = {groups} looks like a cached group "
                    f"count that ungroup_routing does not know; it would keep routing by groups"
                )
            modules.append(module)

    def ungroup() -> None:
        config = adapter.moe_config(model.config)
        setattr(config, adapter.group_field, 1)
        if adapter.topk_group_field is not None:
            setattr(config, adapter.topk_group_field, 1)
        for module in modules:
            for name in count_names | per_token_names:
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, 1)
        logger.warning(
            "dropped group-limited routing (%s=%d -> 1): every token now picks its top-%d among all kept experts",
            adapter.group_field,
            groups,
            adapter.top_k(model.config),
        )

    return ungroup


def _as_indices(value) -> list[int | None] | None:
    """``value`` as a list of expert indices (None where an entry is not one), or None if it is not a sequence."""
    try:
        items = list(value)
    except TypeError:
        return None
    out = []
    for item in items:
        try:
            out.append(_expert_index(item))
        except (TypeError, ValueError):
            out.append(None)
    return out


def _leave_keep_all_layers(
    adapter: MoEAdapter, model: nn.Module, plan: dict[int, Sequence[int]], what: str
) -> dict[int, Sequence[int]]:
    """``plan`` without the entries of layers that must keep all their experts (``adapter.keep_all_experts``); those
    entries may only list every expert in its current order (a no-op). Anything else is refused, naming the layers."""
    fixed = adapter.keep_all_layers(model.config)
    if not fixed & set(plan):
        return plan
    layers = adapter.decoder_layers(model)
    changed = [
        layer
        for layer in sorted(fixed & set(plan))
        if _as_indices(plan[layer]) != list(range(adapter.num_experts(layers[layer])))
    ]
    if changed:
        config = adapter.moe_config(model.config)
        why = "; ".join(
            f"layer {layer} ({adapter.keep_all_experts.describe(config, layer)}; {what}={plan[layer]})"
            for layer in changed
        )
        raise ValueError(
            f"{adapter.model_type}: the plan removes or reorders experts of MoE layer(s) {changed}, which must keep "
            f"all their experts in order: {why}. Leave these layers out of the plan (prunable MoE layers: "
            f"{adapter.prunable_layer_indices(model)})"
        )
    return {layer: kept for layer, kept in plan.items() if layer not in fixed}


def _check_group_structure(adapter: MoEAdapter, config, layer: int, num_experts: int, positions: list[int]) -> None:
    """Group-limited routing scores contiguous blocks of experts as groups; keep that structure intact.

    Each new block must come from a single old group, all groups survive, and every group keeps at least
    the experts its group score is made of (DeepSeek-V3 sums each group's top-2, DeepSeek-V2 takes the
    maximum) with enough experts in the chosen groups.
    """
    groups = adapter.num_groups(config)
    if groups == 1:
        return
    n = len(positions)
    if n % groups:
        raise ValueError(
            f"layer {layer}: keeping {n} experts breaks group-limited routing with {adapter.group_field}={groups}; "
            f"the count must be a multiple of {groups}{DROP_GROUPS_HINT}"
        )
    old_size, new_size = num_experts // groups, n // groups
    blocks = [positions[g * new_size : (g + 1) * new_size] for g in range(groups)]
    origin = []
    for g, block in enumerate(blocks):
        source = {p // old_size for p in block}
        if len(source) != 1:
            raise ValueError(
                f"layer {layer}: new group {g} holds experts {block} from old groups {sorted(source)}; "
                f"with {adapter.group_field}={groups} every group must keep {new_size} experts of one old group "
                f"(list kept experts group by group){DROP_GROUPS_HINT}"
            )
        origin.append(source.pop())
    if len(set(origin)) != groups:
        raise ValueError(
            f"layer {layer}: old groups {origin} appear twice; every group must keep {new_size} experts"
            f"{DROP_GROUPS_HINT}"
        )
    top_k = adapter.top_k(config)
    topk_group = int(getattr(adapter.moe_config(config), adapter.topk_group_field) or groups)
    per_group = adapter.group_score_experts
    if new_size < per_group or topk_group * new_size < top_k:
        raise ValueError(
            f"layer {layer}: {new_size} experts per group is too few for group-limited routing "
            f"(needs >= {per_group} per group and {adapter.topk_group_field}={topk_group} groups x {new_size} "
            f">= top-k {top_k}){DROP_GROUPS_HINT}"
        )


def _expert_index(value) -> int:
    # operator.index, not int(): 0.5 or "1" is not an expert index (int() would make 0.5 expert 0)
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is not an expert index")
    return operator.index(value)


def _validate_positions(
    adapter: MoEAdapter, model: nn.Module, layer: int, positions: Sequence[int], what: str, grouped: bool = True
) -> list[int]:
    num_experts = adapter.num_experts(adapter.decoder_layers(model)[layer])
    try:
        positions = [_expert_index(p) for p in positions]
    except (TypeError, ValueError):
        raise ValueError(
            f"layer {layer}: {what} must be a sequence of integer expert indices, got {positions!r}"
        ) from None
    out_of_range = [p for p in positions if not 0 <= p < num_experts]
    if out_of_range:
        raise ValueError(f"layer {layer}: expert indices {out_of_range} out of range [0, {num_experts})")
    repeated = sorted({p for p in positions if positions.count(p) > 1})
    if repeated:
        raise ValueError(f"layer {layer}: expert indices {repeated} repeated in {what}")
    top_k = adapter.top_k(model.config)
    if len(positions) < top_k:
        raise ValueError(f"layer {layer}: keeping {len(positions)} experts, fewer than top-k={top_k}")
    if grouped:
        _check_group_structure(adapter, model.config, layer, num_experts, positions)
    return positions


def _apply(
    model: nn.Module,
    adapter: MoEAdapter,
    plan: dict[int, list[int]],
    on_tensor_replaced: TensorReplacedHook | None,
) -> None:
    layers = adapter.decoder_layers(model)
    for layer_idx, positions in plan.items():  # before anything changes: a split that cannot work is refused
        check_expert_parallel_count(adapter.experts(layers[layer_idx]), len(positions), layer_idx)
        for name in adapter.tensor_names:
            if _is_packed(layers[layer_idx], name):
                check_quantized_experts(*get_submodule_attr(layers[layer_idx], name))
    mark_pruned(model, adapter)
    config = model.config
    sharded_surgery = None
    for layer_idx, positions in plan.items():
        index = torch.tensor(positions, dtype=torch.long)
        layer = layers[layer_idx]
        old_count = adapter.num_experts(layer)
        # router rows after the routed experts (LongCat's zero-computation experts) stay at the end, in order
        extra = adapter.extra_rows(layer)
        extra_names = set(adapter.extra_row_tensor_names)
        full_index = with_extra_rows(index, old_count, extra)

        def rows(name: str, index=index, full_index=full_index, extra_names=extra_names) -> torch.Tensor:
            return full_index if name in extra_names else index

        # peft adapter wrappers (LoRA on the experts or the router) are set aside while the base tensors are
        # resized, then their factors are sliced by the same index
        owners = [name.rpartition(".")[0] for name in (*adapter.tensor_names, *adapter.count_attributes)]
        with peeled(layer, owners) as chains:
            # FSDP2 / expert-parallel shards (DTensors): kept rows are gathered across ranks, one tensor at a time
            sharded = [name for name in adapter.tensor_names if is_sharded(_lookup(layer, name))]
            if sharded and sharded_surgery is None:
                sharded_surgery = ShardedSurgery(model)
            for name in sharded:
                old, new = sharded_surgery.replace(*get_submodule_attr(layer, name), rows(name))
                if on_tensor_replaced is not None:
                    on_tensor_replaced(old, new, rows(name))
                del old, new
            # hf_moeprune-quantized expert tensors (QLoRA bases): their packed codes and scales are sliced per
            # expert; they are never trainable (integer storage), so no optimizer state follows them
            packed = [name for name in adapter.tensor_names if name not in sharded and _is_packed(layer, name)]
            for name in packed:
                select_quantized_experts(*get_submodule_attr(layer, name), index)
            plain = [name for name in adapter.tensor_names if name not in sharded and name not in packed]
            if on_tensor_replaced is not None:
                before = {name: _lookup(layer, name) for name in plain}
            resized = resize_expert_tensors(
                layer,
                plain,
                adapter.count_attributes,
                len(positions),
                index,
                extra_rows=extra,
                extra_row_tensors=adapter.extra_row_tensor_names,
                total_count_attributes=adapter.total_count_attribute_names,
            )
            if on_tensor_replaced is not None:
                for name, old in before.items():
                    if old is not None:
                        on_tensor_replaced(old, _lookup(layer, name), rows(name))
                del before
            if sharded:
                ShardedSurgery.finish_experts(adapter.experts(layer), len(positions))
        for path, chain in chains.items():
            names = [name for name in (*resized, *sharded, *packed) if name.startswith(path + ".")]
            attrs = {name[len(path) + 1 :] for name in names}
            # a LoRA on a router with extra rows: its lora_B rows follow the router's rows
            chain_index = full_index if extra_names.intersection(names) else index
            slice_adapters(chain, attrs, chain_index, old_count + (extra if chain_index is full_index else 0),
                           on_tensor_replaced)  # fmt: skip
        config.kept_expert_ids[layer_idx] = [config.kept_expert_ids[layer_idx][p] for p in positions]
    counts = expert_counts(model, adapter)
    config.experts_per_layer = counts
    largest = max(c for c in counts if c is not None)
    setattr(adapter.moe_config(config), adapter.num_experts_field, largest)
    record_per_layer_counts(config)  # transformers' own per-layer convention (per_layer_config) says the same
    if hasattr(model, "num_experts"):
        model.num_experts = largest


def _is_packed(layer: nn.Module, dotted: str) -> bool:
    try:
        owner, attr = get_submodule_attr(layer, dotted)
    except AttributeError:
        return False
    return is_quantized_tensor(owner, attr)


def _lookup(layer: nn.Module, dotted: str) -> torch.Tensor | None:
    try:
        owner, attr = get_submodule_attr(layer, dotted)
    except AttributeError:
        return None
    value = getattr(owner, attr, None)
    return value if isinstance(value, torch.Tensor) else None


def prune_experts(
    model: nn.Module,
    keep: Mapping[int, Sequence[int]],
    on_tensor_replaced: TensorReplacedHook | None = None,
    drop_group_limited_routing: bool = False,
) -> nn.Module:
    """Keep only ``keep[layer]`` experts (in that order) in each listed MoE layer; in place.

    With group-limited routing (``n_group`` > 1) the plan must keep the groups intact (a ValueError says how);
    ``drop_group_limited_routing=True`` instead routes the pruned model without groups (see
    `ungroup_routing`), for plans that cannot.

    Every per-expert tensor is sliced (router rows, router/expert biases, correction biases, expert
    weights), module attributes and the config follow, and the model becomes its pruned class, so
    ``save_pretrained``/``from_pretrained`` round-trip. Layers not in ``keep`` are untouched. Each tensor
    is replaced one at a time: no second full-size copy of the model is ever held. Layers the family marks as keeping
    all their experts (`MoEAdapter.keep_all_experts`: DeepSeek-V4's hash-routed layers) may only be listed with
    every expert in order; otherwise a ValueError names them and why, before anything changes.
    """
    model = unwrap_model(model)
    adapter = get_adapter(model)
    _check_layer_indices(adapter, model, keep)
    keep = _leave_keep_all_layers(adapter, model, {int(layer): kept for layer, kept in keep.items()}, "keep")
    grouped = not drop_group_limited_routing
    plan = {layer: _validate_positions(adapter, model, layer, kept, "keep", grouped) for layer, kept in keep.items()}
    ungroup = None if grouped else _group_holders(model, adapter)  # refuses before anything changes
    _apply(model, adapter, plan, on_tensor_replaced)
    if ungroup is not None:
        ungroup()
    logger.info(
        "pruned experts: %s",
        {layer: f"{adapter.num_experts(adapter.decoder_layers(model)[layer])} kept" for layer in plan},
    )
    return model


def permute_experts(
    model: nn.Module,
    order: Mapping[int, Sequence[int]],
    on_tensor_replaced: TensorReplacedHook | None = None,
) -> nn.Module:
    """Reorder each listed layer's experts by ``order[layer]`` (a permutation); outputs do not change.

    Router rows, biases and expert weights move together, so only which contiguous block (and hence
    which expert-parallel rank) each expert lands on changes.
    """
    model = unwrap_model(model)
    adapter = get_adapter(model)
    _check_layer_indices(adapter, model, order)
    order = _leave_keep_all_layers(adapter, model, {int(layer): perm for layer, perm in order.items()}, "order")
    plan = {}
    for layer, perm in order.items():
        layer = int(layer)
        positions = _validate_positions(adapter, model, layer, perm, "order")
        num_experts = adapter.num_experts(adapter.decoder_layers(model)[layer])
        if len(positions) != num_experts:
            raise ValueError(
                f"layer {layer}: order has {len(positions)} entries but the layer has {num_experts} experts; "
                "a permutation must list every expert once"
            )
        plan[layer] = positions
    _apply(model, adapter, plan, on_tensor_replaced)
    return model
