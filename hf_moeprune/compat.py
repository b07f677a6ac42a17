"""Every private (underscore or undocumented) transformers / torch / peft API hf_moeprune relies on, in one place.

Each helper says why it is needed, which public API is missing, and the versions it was checked against:
transformers 5.24.0 (and the test matrix bounds, see ``tests/test_compat.py``), torch 2.13.0, peft 0.21.2,
trl 1.16.0, accelerate 1.x. An upgrade that moves one of these internals should break ``tests/test_compat.py``
first, and then needs a change here only.

Two kinds of private use cannot live here:

- Overrides of private ``Trainer`` methods (``_save_checkpoint``, ``_load_from_checkpoint``, ``_save``): the
  subclasses define them. ``check_trainer_overrides`` verifies at import that transformers still has them with
  the signatures the overrides were written for, and names the installed version otherwise.
- ``format/modeling_moeprune.py`` is copied next to every exported pruned checkpoint and loaded by
  ``trust_remote_code`` where hf_moeprune is not installed, so it must not import this module. Its private uses
  are listed in ``MODELING_FILE_PRIVATE_APIS`` and checked by ``tests/test_compat.py`` like the ones here.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from collections import defaultdict
from collections.abc import Mapping
from copy import deepcopy

import torch
import transformers
from torch import nn

_streaming_logger = logging.getLogger("hf_moeprune.streaming")  # apply_load_conversions logs as streaming did

CHECKED_VERSIONS = {"transformers": "5.24.0", "torch": "2.13.0", "peft": "0.21.2", "trl": "1.16.0"}

MODELING_FILE_PRIVATE_APIS = (
    # PrunedMoEMixin.save_pretrained swaps config/model __class__ to the stock pair to export a stock checkpoint.
    "object.__class__ assignment on a live PreTrainedModel / PreTrainedConfig",
    # make_pruned_classes copies the stock class's answer into the pruned class's cache (transformers 5.24 reads
    # the source file of the class's module to decide whether kernels may be swapped).
    "PreTrainedModel._can_set_attn_implementation / _can_set_experts_implementation and their *_cached_value",
    # _resize_to_config gives resized expert tensors the family's own init.
    "PreTrainedModel._init_weights(module)",
    # resize_expert_tensors keeps a buffer's persistence when it re-registers it.
    "nn.Module._non_persistent_buffers_set",
    # _align_cpu_tensors walks every module's own tensors.
    "nn.Module._parameters / _buffers",
    # record_per_layer_counts / global_expert_count drop allow_global_per_layer_attribute_access again (the mixin has
    # a setter but no way to unset it; to_dict saves whatever the instance dict holds).
    "PreTrainedConfig instance dict holding allow_global_per_layer_attribute_access (HeterogeneousConfigMixin)",
)


class CompatError(RuntimeError):
    """An internal of a dependency hf_moeprune relies on is missing or changed in the installed version."""


def _versions() -> str:
    return f"transformers {transformers.__version__}, torch {torch.__version__}"


# -- argparse (stdlib) ------------------------------------------------------------------------------------------
def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's actions, to relax ``required`` for fields a recipe file supplies.

    ``ArgumentParser._actions`` is undocumented; argparse has no public way to list or change the actions after
    ``add_argument`` (HfArgumentParser adds them from the dataclasses). Stable since Python 3.2; checked on 3.10-3.12.
    """
    return parser._actions


# -- transformers: model and config classes -----------------------------------------------------------------------
def swap_class(obj: object, cls: type) -> None:
    """Turn a live model or config into ``cls`` (a subclass of its class) without rebuilding it.

    transformers has no public way to re-type a loaded model; rebuilding would re-allocate every tensor and drop
    hooks, wrappers (DDP, FSDP2, peft) and optimizer references. Assigning ``__class__`` keeps them. Valid while
    the pruned classes add no ``__slots__``/instance layout (they only add methods); transformers 5.24.
    """
    obj.__class__ = cls


def forget_weight_conversions(model: nn.Module) -> None:
    """Drop the checkpoint key renamings a loaded model remembers for ``save_pretrained``.

    transformers 5.24 stores them as ``model._weight_conversions`` in ``from_pretrained`` and applies them in
    reverse on save (e.g. Mixtral's fused experts back to per-expert ``w1/w2/w3``); the pruned format saves fused
    tensors as they are. There is no public switch per model (``save_original_format`` is per call).
    """
    model.__dict__.pop("_weight_conversions", None)


def experts_implementation(config) -> str | None:
    """The fused-experts kernel a config selects (``eager``, ``grouped_mm``, ...), None without the setting.

    transformers 5.24 has ``model.set_experts_implementation`` but no public getter; the value lives in
    ``config._experts_implementation`` (a property over ``_experts_implementation_internal``).
    """
    return getattr(config, "_experts_implementation", None)


def set_experts_implementation_internal(config, name: str) -> None:
    """Select an experts kernel on one config without validating it against the model class.

    ``model.set_experts_implementation`` checks the name against the built-in kernels and walks every sub-config;
    hf_moeprune registers its own counting kernel (``balancing.expert_parallel``) and switches one config at a
    time. transformers 5.24 stores the choice in ``config._experts_implementation_internal``.
    """
    config._experts_implementation_internal = name


def experts_functions():
    """transformers' registry of fused-experts kernels (``ALL_EXPERTS_FUNCTIONS``), to register a counting one.

    ``transformers.integrations.moe`` is not documented API; its ``register``/``get_interface`` methods are the
    same ``GeneralInterface`` as the documented attention registry. transformers 5.24.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS


def experts_eager_forward(experts_cls: type):
    """The experts class's own (eager) ``forward``, None when it does not dispatch through ``ExpertsInterface``.

    transformers 5.24's ``@use_experts_implementation`` replaces ``forward`` by a dispatcher made with
    ``functools.wraps``, so the eager loop is only reachable as ``forward.__wrapped__``.
    """
    return getattr(experts_cls.forward, "__wrapped__", None)


def is_hf_initialized(tensor: torch.Tensor) -> bool:
    """Whether ``from_pretrained`` filled this tensor from the checkpoint.

    transformers 5.24 flags every loaded tensor with ``_is_hf_initialized``; there is no public list of the tensors
    a quantizer's parametrization received (``missing_keys`` names the parametrized weight, not its storage).
    """
    return bool(getattr(tensor, "_is_hf_initialized", False))


def hf_peft_adapter_flag(model: nn.Module):
    """transformers' marker that adapters were added through ``model.add_adapter`` (None when absent).

    ``PeftAdapterMixin`` keeps it as ``model._hf_peft_config_loaded``; while it is set, ``save_pretrained`` saves only
    the adapter. There is no public way to save the base weights of such a model. transformers 5.24.
    """
    return getattr(model, "_hf_peft_config_loaded", None)


def set_hf_peft_adapter_flag(model: nn.Module, value: bool) -> None:
    """Set transformers' ``_hf_peft_config_loaded`` marker (see ``hf_peft_adapter_flag``)."""
    model._hf_peft_config_loaded = value


def compiled_inner(model: nn.Module) -> nn.Module | None:
    """The module inside a ``torch.compile`` wrapper (None for other modules).

    ``OptimizedModule._orig_mod`` is torch's (2.13) only handle on the wrapped module; accelerate's
    ``unwrap_model`` reads it the same way.
    """
    return getattr(model, "_orig_mod", None)


# -- transformers: Trainer -------------------------------------------------------------------------------------------
# name -> parameter names (after self) the overrides in training/trainer.py and distillation.py are written for,
# as in transformers 5.24.0. ``_get_output_dir`` is called, not overridden.
TRAINER_PRIVATE_METHODS: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("model", "trial"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_save": ("output_dir", "state_dict"),
    "_get_output_dir": ("trial",),
    "save_model": ("output_dir", "_internal_call"),
}


def check_trainer_overrides(trainer_cls: type | None = None) -> None:
    """Fail loudly when ``Trainer`` no longer has the private methods hf_moeprune's trainers override or call.

    MoEPruneTrainer and MoEDistillTrainer write the pruning state / teacher projector into each checkpoint from
    ``_save_checkpoint``, restore the expert layout in ``_load_from_checkpoint`` and keep tokens out of
    ``training_args.bin`` in ``_save``; transformers has no public checkpoint hooks for these (callbacks run after
    the checkpoint is written and cannot change what is loaded). If one is renamed, the override would silently
    never run, so this raises instead.
    """
    trainer_cls = trainer_cls or transformers.Trainer
    problems = []
    for name, expected in TRAINER_PRIVATE_METHODS.items():
        method = getattr(trainer_cls, name, None)
        if not callable(method):
            problems.append(f"{trainer_cls.__name__}.{name} is missing")
            continue
        params = tuple(inspect.signature(method).parameters)[1:]
        if params != expected:
            problems.append(f"{trainer_cls.__name__}.{name}{params} (expected {expected})")
    if problems:
        raise CompatError(
            f"hf_moeprune's trainers override private Trainer methods that changed in {_versions()} "
            f"(written for transformers {CHECKED_VERSIONS['transformers']}): " + "; ".join(problems)
        )


def trainer_output_dir(trainer, trial) -> str:
    """The run folder ``Trainer._save_checkpoint`` writes ``checkpoint-N`` into (it depends on hp-search trials).

    ``Trainer._get_output_dir`` has no public counterpart; transformers 5.24.
    """
    return trainer._get_output_dir(trial)


# -- torch: nn.Module internals --------------------------------------------------------------------------------------
def child_module(parent: nn.Module, name: str) -> nn.Module | None:
    """A direct child by name without ``__getattr__`` (which peft's tuner layers forward to the base layer)."""
    return parent._modules.get(name)


def set_child_module(parent: nn.Module, name: str, child: nn.Module) -> None:
    """Put ``child`` in ``parent``'s module table directly (torch 2.13's ``_modules``), bypassing ``__setattr__`` so
    that swapping a peft tuner layer for its base layer (and back) runs no registration hooks and keeps the order
    of ``named_modules``."""
    parent._modules[name] = child


def set_buffer(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace an existing buffer's tensor, keeping its persistence, without ``register_buffer``'s checks.

    ``module._buffers`` (torch 2.13) is the buffer table; ``register_buffer`` would refuse names that are also
    attributes and reset persistence.
    """
    owner._buffers[name] = value


def own_buffers(owner: nn.Module) -> dict[str, torch.Tensor | None]:
    """The buffer table of ``owner`` itself (torch 2.13's ``_buffers``), with entries for ``None`` buffers and every
    name of a tensor registered under several names (``named_buffers`` deduplicates and skips)."""
    return owner._buffers


def buffer_is_persistent(owner: nn.Module, name: str) -> bool:
    """Whether a buffer is saved in ``state_dict``; torch (2.13) keeps the non-persistent names in the private
    ``_non_persistent_buffers_set`` and has no public getter."""
    return name not in getattr(owner, "_non_persistent_buffers_set", set())


def replace_parametrization_original(chain: nn.Module, name: str, value: nn.Parameter) -> None:
    """Replace the stored ``originalN`` of a ``ParametrizationList`` without re-running ``right_inverse``.

    ``setattr`` on the list would quantize the (already packed) data again; its ``_parameters`` table holds the
    stored tensors (torch 2.13).
    """
    chain._parameters[name] = value


def enter_parametrize_cache() -> None:
    """Start caching parametrized tensors for one forward (re-entrant).

    ``torch.nn.utils.parametrize.cached()`` is a context manager and cannot span a forward pre-hook and a forward
    hook; its state is the private ``_cache_enabled`` counter and ``_cache`` dict (torch 2.13).
    """
    import torch.nn.utils.parametrize as parametrize

    parametrize._cache_enabled += 1


def exit_parametrize_cache() -> None:
    """End one ``enter_parametrize_cache``; the cache is dropped when the outermost one ends.

    The forward hook runs with ``always_call=True``, i.e. also when forward raised, possibly before the pre-hook;
    the count never goes below 0 (a negative count is truthy and would keep every dequantized tensor alive forever).
    """
    import torch.nn.utils.parametrize as parametrize

    parametrize._cache_enabled = max(0, parametrize._cache_enabled - 1)
    if not parametrize._cache_enabled:
        parametrize._cache = {}


# -- torch: packed int4/int8 CPU kernels ---------------------------------------------------------------------------
# torch.ops.aten's underscore ops are the only CPU kernels for packed int4 / int8 weights in torch 2.13 (torchao
# wraps the same ops); their signatures are checked in tests/test_compat.py.
PACKED_KERNEL_OPS = ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")


def packed_kernels_available() -> bool:
    ops = torch.ops.aten
    return all(hasattr(ops, name) for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"))


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor):
    """bf16 ``x @ dequant(packed).T`` for weights packed by ``convert_weight_to_int4pack``."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def int8pack_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor):
    """bf16 ``x @ (int8 weight * per-output-channel scales).T``."""
    if x.shape[-1] % 8:
        # torch 2.13's CPU kernel crashes the process (segfault) when the inner dimension is not a multiple of 8 (an
        # A.X-K2 gated-norm projection of rank 4, for one); such layers are small, so compute them unpacked
        return (x.float() @ (weight.float() * scales.float()[:, None]).T).to(x.dtype)
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


def convert_weight_to_int4pack(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Pack ``[out, in]`` int32 codes in 0..15 into the CPU int4 kernel's layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)


# -- torch: FSDP2 (fully_shard) internals ------------------------------------------------------------------------
# FSDP2 keeps, per parameter, an FSDPParam with the padded local shard, sizes and the registered DTensor. A
# parameter whose global shape changes (expert surgery) must be re-initialised there; torch 2.13 has no public API
# for it, so hf_moeprune runs what fully_shard itself runs at wrap time.
def fsdp_param_group(module: nn.Module):
    """The ``FSDPParamGroup`` fully_shard attached to ``module`` (None when it manages no parameters)."""
    return module._get_fsdp_state()._fsdp_param_group


def fsdp_param_is_resharded(fsdp_param) -> bool:
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    return fsdp_param.sharded_state == ShardedState.SHARDED


def fsdp_param_fqn(fsdp_param) -> str:
    return fsdp_param._param_fqn


def fsdp_unsharded_dtensor_spec(fsdp_param):
    """The DTensor spec of the parameter FSDP2 wrapped (set when it wraps a DTensor, e.g. expert parallelism)."""
    return getattr(fsdp_param, "_unsharded_dtensor_spec", None)


def reinit_fsdp_param(fsdp_param, param: nn.Parameter) -> nn.Parameter:
    """Re-initialise an FSDP2 parameter from a new full value (any shape); returns the new sharded parameter.

    ``FSDPParam._init_sharded_param`` chunks the (identical on every rank) value, keeps this rank's padded shard and
    registers the new DTensor on the owning module(s). The all-gather buffers and the unsharded parameter are sized
    from the old shape, so they are dropped; FSDP re-creates them at the next all-gather. torch 2.13.
    """
    fsdp_param._init_sharded_param(param, fsdp_param.device, None, fsdp_param.mesh_info)
    if fsdp_param.post_forward_mesh_info:
        fsdp_param._init_sharded_post_forward_param_metadata(param)
    fsdp_param.init_dtype_attrs(fsdp_param.mp_policy)
    fsdp_param._init_extensions()
    fsdp_param.all_gather_outputs = []
    fsdp_param.unsharded_accumulated_grad = None
    fsdp_param.__dict__.pop("_unsharded_param", None)
    return fsdp_param.sharded_param


# -- torch: DistributedDataParallel --------------------------------------------------------------------------------
def rebuild_ddp(wrapped: nn.parallel.DistributedDataParallel, module: nn.Module) -> None:
    """Rebuild a DDP wrapper *in place* around ``module`` with the same settings.

    After expert surgery DDP's reducer holds the replaced parameters. The training loop, the accelerator and
    ``Trainer.model_wrapped`` all hold this object (the loop asks it for ``no_sync`` during gradient
    accumulation), so a new wrapper would not be seen; DDP has no public way to re-register parameters. Re-running
    ``__init__`` on the same object (torch 2.13) builds a new reducer and releases the old one with its references
    to the full-size tensors. The new parameters are identical on all ranks, so the initial broadcast changes nothing.
    """
    nn.parallel.DistributedDataParallel.__init__(
        wrapped,
        module,
        device_ids=wrapped.device_ids,
        output_device=wrapped.output_device,
        process_group=wrapped.process_group,
        mixed_precision=wrapped.mixed_precision,
        broadcast_buffers=wrapped.broadcast_buffers,
        find_unused_parameters=wrapped.find_unused_parameters,
        gradient_as_bucket_view=wrapped.gradient_as_bucket_view,
        static_graph=wrapped.static_graph,
        bucket_cap_mb=wrapped.bucket_bytes_cap / (1024 * 1024),
    )


# -- transformers: expert parallelism --------------------------------------------------------------------------------
def is_expert_parallel(experts: nn.Module) -> bool:
    """Whether transformers' expert parallelism sharded this experts module (its private marker, 5.24)."""
    return bool(getattr(experts, "_is_expert_parallel", False))


def ep_dispatches(experts: nn.Module) -> list:
    """The ``EPImplementation`` objects behind an ``ep_dispatch_experts`` module's forward (none without one).

    Private (transformers 5.24): ``EpDispatchExpertsParallel.install_forward`` sets ``module.forward`` to a
    closure over the implementation; each implementation caches ``num_local_experts`` when it is built, and the
    default ``AutoEP`` holds further ones (all-to-all, all-reduce) as attributes. They are found through the
    closures (also when hf_moeprune's REAP wrapper sits in front) and their attributes, so every cached count
    can follow a removal.
    """
    from transformers.distributed.expert_parallel import EPImplementation

    found, seen, stack = [], set(), [experts.__dict__.get("forward")]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, EPImplementation):
            found.append(item)
            stack.extend(v for v in vars(item).values() if isinstance(v, EPImplementation))
        elif callable(item):
            stack.extend(cell.cell_contents for cell in getattr(item, "__closure__", None) or ())
    return found


# -- transformers: checkpoint key conversions (core_model_loading, undocumented) -------------------------------------
# Streaming surgery reads a checkpoint layer by layer, so it must rename/fuse checkpoint keys exactly as
# from_pretrained does, and write them back as save_pretrained does. transformers 5.24 exposes this only through
# from_pretrained/save_pretrained as a whole.
def load_conversions(model: nn.Module) -> list:
    """The transforms ``from_pretrained`` applies to this model's checkpoint keys (with the legacy renamings)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model)


def apply_load_conversions(
    model: nn.Module, conversions: list, meta_state: Mapping[str, torch.Tensor], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors -> model-named tensors, as ``convert_and_load_state_dict_in_model`` forms them
    (same renaming, same converter grouping, cast to the dtype of the parameter they fill). Keys the model does
    not have are dropped, as loading drops unexpected keys. Empties ``tensors`` (the converters take them over)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    groups: dict[str, object] = {}
    # the tensors move out of ``tensors`` into the converters (which free each source once it is merged), so a
    # fused group does not hold its per-expert sources until everything is converted
    for key in sorted(tensors, key=dot_natural_key):
        tensor = tensors.pop(key)
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if renamed not in meta_state:
            _streaming_logger.debug(
                "checkpoint key %s is not a weight of the model; dropped (as from_pretrained drops it)", key
            )
            continue
        if pattern is not None:
            mapping = groups.setdefault(renamed, deepcopy(pattern_to_converter[pattern]))
        else:
            mapping = groups.setdefault(renamed, WeightRenaming(key, renamed))
            pattern = key
        mapping.add_tensor(renamed, key, pattern, tensor)
        del tensor
    out = {}
    for first_name, mapping in groups.items():
        for name, value in mapping.convert(first_name, model=model, config=model.config).items():
            value = value[0] if isinstance(value, list) else value
            out[name] = value.to(meta_state[name].dtype) if name in meta_state else value
    return out


def stacked_slots(
    model: nn.Module,
    conversions: list,
    meta_state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[str, int, dict[str, tuple[int, int, int]]] | None:
    """For checkpoint keys (``shapes``: key -> shape on disk) that all fuse into one model tensor by stacking
    (``MergeModulelist(dim=0)``, optionally then ``Concatenate``: how every legacy per-expert MoE layout loads):
    that tensor's name, the concatenation dim ``d`` (0 without one) and, per key, ``(index, start, length)``: the
    key's tensor is ``fused[start + index]`` for ``d == 0``, else ``fused[index].narrow(d - 1, start, length)``.
    ``apply_load_conversions`` builds the same tensor, but only after holding every source and the intermediate
    stacks at once; filling slots of one preallocated tensor holds one source at a time. None when the keys
    convert any other way (the op classes and their order semantics are transformers 5.24's; an unknown op falls
    back to ``apply_load_conversions``, and tests compare both paths bit for bit)."""
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        dot_natural_key,
        rename_source_key,
    )

    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    targets, by_pattern = set(), defaultdict(list)
    for key in sorted(shapes, key=dot_natural_key):  # the order apply_load_conversions stacks them in
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if pattern is None or renamed not in meta_state:
            return None
        targets.add(renamed)
        by_pattern[pattern].append(key)
    if len(targets) != 1:
        return None
    (target,) = targets
    converter = pattern_to_converter[next(iter(by_pattern))]
    ops = converter.operations
    merge_only = len(ops) == 1 and type(ops[0]) is MergeModulelist
    merge_concat = len(ops) == 2 and type(ops[0]) is MergeModulelist and type(ops[1]) is Concatenate
    if not (merge_only or merge_concat) or ops[0].dim != 0 or len(converter.target_patterns) != 1:
        return None
    if any(pattern_to_converter[p] is not converter for p in by_pattern) or (merge_only and len(by_pattern) != 1):
        return None
    patterns = [p for p in converter.source_patterns if p in by_pattern]  # Concatenate keeps this order
    stacked = []
    for pattern in patterns:
        shape = {tuple(shapes[k]) for k in by_pattern[pattern]}
        if len(shape) != 1:
            return None
        stacked.append((len(by_pattern[pattern]), *shape.pop()))
    ndim = len(stacked[0])
    dim = ops[1].dim % ndim if merge_concat else 0
    if any(len(s) != ndim or s[:dim] + s[dim + 1 :] != stacked[0][:dim] + stacked[0][dim + 1 :] for s in stacked):
        return None
    full = list(stacked[0])
    full[dim] = sum(s[dim] for s in stacked)
    if tuple(full) != tuple(meta_state[target].shape):
        return None
    slots, start = {}, 0
    for pattern, shape in zip(patterns, stacked, strict=True):
        for index, key in enumerate(by_pattern[pattern]):
            slots[key] = (index, start, shape[dim])
        start += shape[dim]
    return target, dim, slots


def converted_key(key: str, conversions: list, prefix: str, meta_state: Mapping[str, torch.Tensor]) -> str:
    """The model name ``from_pretrained`` gives checkpoint key ``key`` (several keys may share one, e.g. the
    per-expert ``w1``/``w3`` of a fused ``gate_up_proj``)."""
    from transformers.core_model_loading import WeightConverter, rename_source_key

    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
    target, _ = rename_source_key(key, renamings, converters, prefix, meta_state)
    return target


def revert_conversions(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model-named tensors -> the names ``save_pretrained`` writes for ``model`` (e.g. per-expert keys for a stock
    Mixtral, fused tensors as they are for the hf_moeprune format)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


# -- peft ------------------------------------------------------------------------------------------------------------
def peft_param_ndim(wrapper: nn.Module) -> int:
    """The rank of the parameter a peft ``ParamWrapper`` (LoRA on an nn.Parameter) targets: 3 for fused
    ``[experts, out, in]`` tensors. peft 0.21.2 records it only in the private ``_param_ndim`` (default 2)."""
    return getattr(wrapper, "_param_ndim", 2)
