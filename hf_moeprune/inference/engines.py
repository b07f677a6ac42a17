"""Generation engines (registry ``ENGINES``): padded batches and continuous batching; the experts kernel."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from hf_moeprune import compat
from hf_moeprune.quantization.packed_experts import PACKED_EXPERTS

if TYPE_CHECKING:
    from hf_moeprune.inference.options import GenerationOptions

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATIONS = ("auto", "keep", "eager", "grouped_mm", "batched_mm")


OnDone = Callable[[int, list[int]], None]


class Engine(Protocol):
    def __call__(
        self,
        model: nn.Module,
        inputs: Sequence[list[int]],
        options: GenerationOptions,
        generation_config: Any,
        on_done: OnDone,
    ) -> None:
        """Generate for every ``inputs[i]`` and call ``on_done(i, new_token_ids)`` as each one finishes."""


def plan_batches(lengths: Sequence[int], batch_size: int, window: int) -> list[list[int]]:
    """Indices grouped into batches: length-sorted within windows of ``window`` consecutive prompts.

    Within a window, batches are ordered by the smallest original index they hold, so the window's
    first prompts finish first and the ordered writer can flush early.
    """
    batches: list[list[int]] = []
    for start in range(0, len(lengths), window):
        idx = sorted(range(start, min(start + window, len(lengths))), key=lambda i: (lengths[i], i))
        chunk = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
        batches.extend(sorted(chunk, key=min))
    return batches


def _pad_id(model: nn.Module, generation_config) -> int:
    for candidate in (generation_config.pad_token_id, getattr(model.config, "pad_token_id", None)):
        if candidate is not None:
            return int(candidate)
    eos = generation_config.eos_token_id
    if eos is None:
        raise ValueError("the model has neither a pad_token_id nor an eos_token_id; set one on its generation config")
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos)


def padded_engine(model, inputs, options, generation_config, on_done, tokenizer=None) -> None:
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no generate(); wrap it in a transformers GenerationMixin model")
    pad = _pad_id(model, generation_config)
    device = _device_of(model)
    lengths = [len(x) for x in inputs]
    gen_kwargs: dict[str, Any] = {}
    if options.stop and tokenizer is not None:
        # lets generate() drop a row once it shows a stop string; the cut itself is finish_completion's
        gen_kwargs["tokenizer"] = tokenizer
    for batch in plan_batches(lengths, options.batch_size, options.window):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - lengths[i] :] = torch.tensor(inputs[i], dtype=torch.long)
            mask[row, width - lengths[i] :] = 1
        if options.do_sample:
            # seeded by the batch's first prompt, so a batch's samples do not depend on earlier batches
            torch.manual_seed(options.seed * 1_000_003 + min(batch))
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=copy.deepcopy(generation_config),
                **gen_kwargs,
            )
        out = out.cpu()
        for row, i in enumerate(batch):
            on_done(i, out[row, width:].tolist())


def _continuous_config(inputs: Sequence[list[int]], options: GenerationOptions):
    """Cache sized for this workload: left alone, the manager reserves most of free host RAM on CPU."""
    from transformers import ContinuousBatchingConfig

    page = 64
    longest = max(len(x) for x in inputs) + options.max_new_tokens
    per_request = -(-longest // page)
    return ContinuousBatchingConfig(
        page_size=page,
        num_blocks=per_request * options.batch_size + 1,
        max_batch_tokens=max(options.batch_size, min(8192, options.batch_size * max(len(x) for x in inputs))),
        max_requests_per_batch=options.batch_size,
        allow_block_sharing=False,
        seed=options.seed,
    )


def continuous_engine(model, inputs, options, generation_config, on_done, tokenizer=None) -> None:
    if not hasattr(model, "continuous_batching_context_manager"):
        logger.warning("%s has no continuous batching support; using the padded engine", type(model).__name__)
        padded_engine(model, inputs, options, generation_config, on_done, tokenizer)
        return
    pending = {f"p{i}": i for i in range(len(inputs))}
    config = copy.deepcopy(generation_config)  # the manager edits the config it is given
    config.stop_strings = None  # a stopping criterion, which continuous batching does not run; cut afterwards
    try:
        with model.continuous_batching_context_manager(
            generation_config=config,
            continuous_batching_config=_continuous_config(inputs, options),
            block=True,
            timeout=60,
            # warmup captures CUDA graphs; on CPU it only costs a full-size forward (30-50 s for a toy model)
            warmup=_device_of(model).type == "cuda",
        ) as manager:
            for request_id, i in pending.items():
                manager.add_request(
                    input_ids=list(inputs[i]), request_id=request_id, max_new_tokens=options.max_new_tokens
                )
            waiting = dict(pending)
            while waiting:
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        break
                    continue
                if not result.is_finished() or result.request_id not in waiting:
                    continue
                if result.error is not None:
                    logger.warning("continuous batching request %s failed: %s", result.request_id, result.error)
                    continue
                on_done(waiting.pop(result.request_id), list(result.generated_tokens))
            pending = waiting
    except Exception as exc:  # any failure of the optional engine leaves the padded one to finish
        logger.warning("continuous batching failed (%s: %s); using the padded engine", type(exc).__name__, exc)
    if pending:
        left = sorted(pending.values())
        logger.warning("finishing %d prompt(s) with the padded engine", len(left))
        padded_engine(
            model,
            [inputs[i] for i in left],
            options,
            generation_config,
            lambda j, tokens: on_done(left[j], tokens),
            tokenizer,
        )


ENGINES: dict[str, Engine] = {"padded": padded_engine, "continuous": continuous_engine}


def resolve_engine(name: str, options: GenerationOptions) -> str:
    """``auto`` -> the engine measured fastest on CPU (padded), which is also the reproducible one for sampling."""
    if name == "auto":
        return "padded"
    if name not in ENGINES:
        raise ValueError(f"engine {name!r} is not known; choose one of {['auto', *ENGINES]}")
    if name == "continuous" and options.do_sample:
        logger.warning("continuous batching samples in a background thread: samples are not reproducible by seed")
    return name


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def set_experts_implementation(model: nn.Module, name: str) -> str | None:
    """Select the fused-experts kernel; returns the one in use (None when the model has no such setting).

    ``auto`` picks ``grouped_mm``: one grouped matmul over all experts, several times faster than the
    per-expert python loop (``eager``) at decoding batch sizes on CPU (benchmarks/inference_benchmark.py);
    a model quantized on CPU keeps hf_moeprune's packed runtime (``quantization/packed_experts.py``).
    Models without the setting (a quantizer's own expert modules, remote code) are left as they are.
    """
    if name not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"experts implementation {name!r} is not known; choose one of {list(EXPERTS_IMPLEMENTATIONS)}")
    config = getattr(model, "config", None)
    current = compat.experts_implementation(config)
    if name == "keep" or not hasattr(model, "set_experts_implementation"):
        return current
    if name == "auto" and current == PACKED_EXPERTS:
        return current  # quantized on CPU: grouped_mm would dequantize every expert on every forward
    wanted = "grouped_mm" if name == "auto" else name
    try:
        model.set_experts_implementation(wanted)
    except (ValueError, RuntimeError, ImportError, AttributeError) as exc:
        if name != "auto":
            raise ValueError(f"experts implementation {wanted!r} is not available for this model: {exc}") from exc
        logger.info("keeping experts implementation %r (%s)", current, exc)
    return compat.experts_implementation(config)
