"""peft LoRA adapters on MoE models: expert surgery through adapter wrappers, per-expert adapter saliency,
saving the pruned base next to the adapter, and merging.

peft (checked: 0.21) wraps a targeted module in a tuner layer whose ``base_layer`` is the original module:
``lora.Linear`` for ``target_modules`` and, for ``target_parameters`` such as ``mlp.experts.gate_up_proj``, a
``ParamWrapper`` per parameter (nested when one module has several targeted parameters). A ``ParamWrapper`` on a
3D expert tensor ``[E, a, b]`` keeps ``lora_A.weight`` as ``[E * r, in]`` (expert-major rows: expert ``e`` owns
rows ``e*r .. e*r+r-1``) and ``lora_B.weight`` as ``[out, r * E]`` (expert-minor columns: column ``j*E + e`` is
rank ``j`` of expert ``e``), and ``num_experts`` = E. On a 2D per-expert tensor (a router weight ``[E, H]``) and on
a ``lora.Linear`` around a router, the experts are the output features: rows of ``lora_B``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from hf_moeprune import compat

logger = logging.getLogger(__name__)

TensorReplaced = Callable[..., None]


def _peft_imported() -> bool:
    """Whether peft has been imported. A peft object can only exist after that, and importing peft just to ask
    costs ~50 MB of resident memory (it pulls in bitsandbytes, sympy, networkx): measured as the largest single
    step between calibration and surgery in layer-wise one-shot pruning."""
    return "peft" in sys.modules


def is_tuner_layer(module: nn.Module) -> bool:
    """A peft tuner layer (LoRA and friends): it wraps ``base_layer``."""
    if not _peft_imported():
        return False
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: no adapters can exist
        return False
    return isinstance(module, BaseTunerLayer)


def is_peft_model(model: nn.Module) -> bool:
    if not _peft_imported():
        return False
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def has_adapters(model: nn.Module) -> bool:
    return any(is_tuner_layer(m) for m in model.modules())


def innermost(module: nn.Module) -> nn.Module:
    while is_tuner_layer(module):
        module = module.base_layer
    return module


def wrapper_chain(module: nn.Module) -> list[nn.Module]:
    """The tuner layers around one module, outermost first."""
    chain = []
    while is_tuner_layer(module):
        chain.append(module)
        module = module.base_layer
    return chain


@contextlib.contextmanager
def peeled(root: nn.Module, owner_paths: list[str]) -> Iterator[dict[str, list[nn.Module]]]:
    """Temporarily put the original modules back in place of the tuner layers on ``owner_paths`` (dotted,
    relative to ``root``), so code that addresses ``mlp.experts.gate_up_proj`` reaches the real tensor. Yields
    ``{path: wrapper chain}`` for the paths that were wrapped; the wrappers are restored on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    chains: dict[str, list[nn.Module]] = {}
    try:
        for path in sorted(set(owner_paths), key=lambda p: p.count(".")):
            parent = root
            parts = path.split(".") if path else []
            for depth, part in enumerate(parts):
                child = compat.child_module(parent, part) if isinstance(parent, nn.Module) else None
                if child is None:
                    break
                if is_tuner_layer(child):
                    chains[".".join(parts[: depth + 1])] = wrapper_chain(child)
                    base = innermost(child)
                    compat.set_child_module(parent, part, base)
                    swapped.append((parent, part, child))
                    child = base
                parent = child
        yield chains
    finally:
        for parent, part, wrapper in reversed(swapped):
            compat.set_child_module(parent, part, wrapper)


def _replace_weight(linear: nn.Linear, data: torch.Tensor, index: torch.Tensor, dim: int, on_replaced) -> None:
    old = linear.weight
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    linear.weight = new
    linear.out_features, linear.in_features = new.shape[0], new.shape[1]
    if on_replaced is not None:
        if dim == 0:
            on_replaced(old, new, index)
        else:
            on_replaced(old, new, index, dim=dim)


def _check_plain_lora(wrapper: nn.Module) -> None:
    for name in ("lora_magnitude_vector", "lora_embedding_A"):
        store = getattr(wrapper, name, None)
        if store is not None and len(store):
            raise ValueError(
                f"{type(wrapper).__name__} with {name} (DoRA / embedding adapters) on an expert tensor cannot be "
                "sliced by expert surgery; use plain LoRA on the experts and router"
            )


def slice_adapters(
    chain: list[nn.Module],
    resized: set[str],
    index: torch.Tensor,
    old_num_experts: int,
    on_tensor_replaced: TensorReplaced | None = None,
) -> list[str]:
    """Slice the LoRA factors of every wrapper in ``chain`` whose base tensor (``resized``: attribute names on the
    innermost module) lost or reordered experts by ``index``. Returns the adapter weights replaced (for logs)."""
    done = []
    for wrapper in chain:
        target = getattr(wrapper, "parameter_name", None) or "weight"
        if target not in resized:
            continue
        _check_plain_lora(wrapper)
        per_expert_3d = getattr(wrapper, "num_experts", 1) > 1 or compat.peft_param_ndim(wrapper) == 3
        for name in list(getattr(wrapper, "lora_A", {}).keys()):
            lora_a, lora_b = wrapper.lora_A[name], wrapper.lora_B[name]
            if per_expert_3d:
                rank = lora_a.weight.shape[0] // old_num_experts
                rows = (index[:, None] * rank + torch.arange(rank)[None, :]).reshape(-1)
                _replace_weight(lora_a, lora_a.weight.detach().index_select(0, rows.to(lora_a.weight.device)), rows,
                                0, on_tensor_replaced)  # fmt: skip
                # column j*E + e: rank j of expert e
                cols = (torch.arange(rank)[:, None] * old_num_experts + index[None, :]).reshape(-1)
                _replace_weight(lora_b, lora_b.weight.detach().index_select(1, cols.to(lora_b.weight.device)), cols,
                                1, on_tensor_replaced)  # fmt: skip
            else:  # the experts are the output features (a router): rows of lora_B
                _replace_weight(lora_b, lora_b.weight.detach().index_select(0, index.to(lora_b.weight.device)),
                                index, 0, on_tensor_replaced)  # fmt: skip
                if lora_b.bias is not None:
                    old_bias = lora_b.bias
                    lora_b.bias = nn.Parameter(old_bias.detach().index_select(0, index), old_bias.requires_grad)
                    if on_tensor_replaced is not None:
                        on_tensor_replaced(old_bias, lora_b.bias, index)
            done.append(f"{type(wrapper).__name__}.{target}[{name}]")
        if per_expert_3d:
            wrapper.num_experts = len(index)
        else:
            wrapper.out_features = len(index)
    return done


def expert_adapter_saliency(experts: nn.Module, num_experts: int) -> torch.Tensor | None:
    """First-order Taylor saliency of each expert's LoRA factors, ``sum theta * grad`` over the rows/columns the
    expert owns (per adapter tensor; the caller takes the absolute value of the sum). None if no expert adapter
    has a gradient."""
    total = None
    for wrapper in wrapper_chain(experts):
        if getattr(wrapper, "num_experts", 1) != num_experts or num_experts == 1:
            continue
        for name in wrapper.lora_A:
            a, b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
            for weight, per_expert in ((a, lambda t: t.reshape(num_experts, -1).sum(1)),
                                       (b, lambda t: t.reshape(t.shape[0], -1, num_experts).sum((0, 1)))):  # fmt: skip
                if weight.grad is None:
                    continue
                contribution = per_expert(weight.detach().float() * weight.grad.detach().float())
                total = contribution if total is None else total + contribution
    return total


def experts_have_trainable_tensors(experts: nn.Module, num_experts: int) -> bool:
    """Whether per-expert gradients will exist: a trainable expert tensor or a trainable per-expert adapter."""
    base = innermost(experts)
    if any(p.requires_grad and p.dim() > 0 and p.shape[0] == num_experts for p in base.parameters(recurse=False)):
        return True
    return any(
        getattr(w, "num_experts", 1) == num_experts > 1 and any(p.requires_grad for p in w.lora_A.parameters())
        for w in wrapper_chain(experts)
    )


def _outer_tuner_paths(model: nn.Module) -> list[str]:
    """Paths of the outermost tuner layers (nested ones, e.g. ``experts.base_layer``, live inside them)."""
    paths = [name for name, module in model.named_modules() if name and is_tuner_layer(module)]
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]


@contextlib.contextmanager
def without_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """The model as its original modules (every tuner layer replaced by its base layer), e.g. to save the base
    weights under their own names. Models with adapters added through transformers' ``add_adapter`` save only the
    adapter from ``save_pretrained``; that switch is turned off for the duration too."""
    outer = _outer_tuner_paths(model)
    flag = compat.hf_peft_adapter_flag(model)
    with peeled(model, outer):
        if flag:
            compat.set_hf_peft_adapter_flag(model, False)
        try:
            yield model
        finally:
            if flag:
                compat.set_hf_peft_adapter_flag(model, flag)


def save_adapter_and_base(
    model: nn.Module, output_dir: str, base_subdir: str, is_main_process: bool = True, export_stock: bool = True
) -> None:
    """Save a LoRA run: the adapter in ``output_dir`` and the pruned base model in ``output_dir/base_subdir``, so
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), output_dir)`` restores it.

    The adapter's tensors already have the pruned shapes; only a base with the same expert layout takes them, so
    the base is always saved with it (its experts are frozen, but removal and the balancing bias change it)."""
    from hf_moeprune.surgery import unwrap_model

    base = unwrap_model(model)
    if is_peft_model(model):
        model.save_pretrained(output_dir, is_main_process=is_main_process)
    elif is_main_process:
        _save_injected_adapters(base, Path(output_dir))
    with without_adapters(base):
        base.save_pretrained(Path(output_dir) / base_subdir, is_main_process=is_main_process, export_stock=export_stock)


def _save_injected_adapters(model: nn.Module, output_dir: Path) -> None:
    """Adapters injected into the model itself (transformers' ``add_adapter``, peft's ``inject_adapter_in_model``):
    written with peft's own state-dict function in the layout ``PeftModel.from_pretrained`` reads (transformers'
    ``save_pretrained`` route asks for a newer peft than this project pins)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    configs = getattr(model, "peft_config", None) or {}
    if not configs:
        raise ValueError(
            "the model has LoRA layers but no peft_config to save them with; add adapters with "
            "model.add_adapter(LoraConfig(...)) or get_peft_model(model, LoraConfig(...))"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        target = output_dir if name == "default" else output_dir / name
        target.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(model, adapter_name=name)
        config.save_pretrained(str(target))
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(target / "adapter_model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip


def load_base_weights(model: nn.Module, base_dir: Path) -> None:
    """Load the base weights of a LoRA checkpoint (saved by ``save_adapter_and_base`` in the pruned format) into
    ``model``, whose expert layout already matches; adapters are left as they are."""
    from safetensors.torch import load_file

    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {base_dir}")
    with without_adapters(model):
        expected = set(model.state_dict())
        for file in files:
            state = load_file(str(file))
            unexpected = sorted(set(state) - expected)
            if unexpected:
                raise ValueError(f"{file}: tensors {unexpected[:5]} do not belong to this model's base")
            model.load_state_dict(state, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its (pruned) base weights and return the plain model; its
    ``save_pretrained`` then writes a model that ``AutoModelForCausalLM.from_pretrained`` loads.

    A QLoRA base (packed by ``hf_moeprune.quantize``) is dequantized first: an update cannot be folded into packed
    4-bit codes without re-quantizing it away, so the merged model is a plain full-precision one."""
    from hf_moeprune.quantization.quantizer import dequantize, quantized_targets
    from hf_moeprune.surgery import unwrap_model

    base = unwrap_model(model)
    if quantized_targets(base):
        dequantize(base)
    if is_peft_model(model):
        return model.merge_and_unload()
    if has_adapters(model):
        for name in _outer_tuner_paths(model):
            module = model.get_submodule(name)
            for wrapper in wrapper_chain(module):  # nested ParamWrappers each merge their own parameter
                wrapper.merge()
            base = innermost(module)
            parent_name, _, attr = name.rpartition(".")
            compat.set_child_module(model.get_submodule(parent_name) if parent_name else model, attr, base)
        if compat.hf_peft_adapter_flag(model):
            compat.set_hf_peft_adapter_flag(model, False)
            model.peft_config = {}
    return model


def merge_saved_lora(adapter_dir: str, output_dir: str, base_dir: str | None = None, export_stock: bool = True) -> None:
    """Merge a saved LoRA run (``save_model``'s output: adapter + ``base_model/``) into one plain pruned model in
    ``output_dir``."""
    from peft import PeftModel

    from hf_moeprune.loading import load_model
    from hf_moeprune.utils import atomic_output_dir

    base_dir = base_dir if base_dir is not None else str(Path(adapter_dir) / "base_model")
    model = PeftModel.from_pretrained(load_model(base_dir), adapter_dir)
    merged = merge_lora(model)
    with atomic_output_dir(output_dir) as staging:
        merged.save_pretrained(staging, export_stock=export_stock)
    logger.info("merged %s into %s: %s", adapter_dir, base_dir, output_dir)
