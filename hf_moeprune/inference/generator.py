"""The generator: generation config, ``BatchGenerator``, ``generate`` and ``generate_file``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from hf_moeprune.inference.completion import Completion, finish_completion
from hf_moeprune.inference.engines import ENGINES, _device_of, resolve_engine, set_experts_implementation
from hf_moeprune.inference.memory import PeakMemory
from hf_moeprune.inference.options import GenerationOptions
from hf_moeprune.inference.output import OrderedWriter, exclusive_output, jsonl_appender, mark_as_ours, writer_marker
from hf_moeprune.inference.prompts import Prompt, _id_key, completed_ids, read_prompts
from hf_moeprune.inference.stats import GenerationStats
from hf_moeprune.utils import atomic_output_file, remove_stale_temporaries

logger = logging.getLogger(__name__)


def build_generation_config(model: nn.Module, tokenizer, options: GenerationOptions):
    """A fresh GenerationConfig: the options, plus EOS/PAD/BOS from the model (or tokenizer)."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)

    def special(name: str):
        for source in (base, getattr(model, "config", None), tokenizer):
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return value
        return None

    kwargs: dict[str, Any] = dict(
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        eos_token_id=special("eos_token_id"),
        pad_token_id=special("pad_token_id"),
        bos_token_id=special("bos_token_id"),
    )
    if kwargs["pad_token_id"] is None and kwargs["eos_token_id"] is not None:
        eos = kwargs["eos_token_id"]
        kwargs["pad_token_id"] = eos[0] if isinstance(eos, (list, tuple)) else eos
    if options.do_sample:
        kwargs.update(temperature=options.temperature, top_k=options.top_k or None, top_p=options.top_p)
    else:
        # stock configs may carry sampling defaults; greedy must not warn about or use them
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if options.stop:
        kwargs["stop_strings"] = list(options.stop)
    return GenerationConfig(**kwargs)


@contextlib.contextmanager
def _router_logits_off(model: nn.Module):
    """Generate without router logits, whatever the config says (configs saved from training often carry
    ``output_router_logits=True``). They only feed a training loss, cost memory at every step, and the stock
    auxiliary loss fails under a padded KV-cache decode (the attention mask covers the cache, the logits only
    the new tokens). The config's value is restored afterwards."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "output_router_logits", False):
        yield
        return
    config.output_router_logits = False
    try:
        yield
    finally:
        config.output_router_logits = True


class BatchGenerator:
    """Generates completions for many prompts with one model; see ``hf_moeprune.inference`` for the rules."""

    def __init__(self, model: nn.Module, tokenizer, options: GenerationOptions | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.options = options or GenerationOptions()
        self.experts_implementation = set_experts_implementation(model, self.options.experts_implementation)
        self.engine = resolve_engine(self.options.engine, self.options)
        self.generation_config = build_generation_config(model, tokenizer, self.options)
        eos = self.generation_config.eos_token_id
        self.eos_ids = set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def tokenize(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        encoded = self.tokenizer([p.prompt for p in prompts], add_special_tokens=True)["input_ids"]
        empty = [p.id for p, ids in zip(prompts, encoded) if not ids]
        if empty:
            raise ValueError(f"prompt(s) with ids {empty} tokenize to zero tokens")
        return [list(ids) for ids in encoded]

    def run(
        self,
        prompts: Sequence[Prompt | str],
        on_result: Callable[[int, Completion], None] | None = None,
        progress: bool = True,
    ) -> tuple[list[Completion], GenerationStats]:
        """Completions in the order of ``prompts``; ``on_result(i, completion)`` fires as each finishes."""
        prompts = [p if isinstance(p, Prompt) else Prompt(i, p) for i, p in enumerate(prompts)]
        inputs = self.tokenize(prompts) if prompts else []
        results: list[Completion | None] = [None] * len(prompts)
        reasons: dict[str, int] = {}
        device = _device_of(self.model)
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
        counted = {"tokens": 0}

        def done(i: int, new_tokens: list[int]) -> None:
            text, used, reason = finish_completion(new_tokens, self.eos_ids, self._decode, self.options.stop)
            completion = Completion(prompts[i].id, prompts[i].prompt, text, len(used), reason, used)
            results[i] = completion
            reasons[reason] = reasons.get(reason, 0) + 1
            counted["tokens"] += len(used)
            bar.update(1)
            bar.set_postfix(tok_s=f"{counted['tokens'] / max(time.perf_counter() - start, 1e-9):.1f}")
            if on_result is not None:
                on_result(i, completion)

        start = time.perf_counter()
        with PeakMemory(device) as memory, _router_logits_off(self.model):
            if inputs:
                ENGINES[self.engine](self.model, inputs, self.options, self.generation_config, done, self.tokenizer)
        seconds = time.perf_counter() - start
        bar.close()
        missing = [prompts[i].id for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"the {self.engine} engine returned no result for prompt id(s) {missing}")
        stats = GenerationStats(
            prompts=len(prompts),
            generated_tokens=counted["tokens"],
            seconds=seconds,
            prompts_per_s=len(prompts) / seconds if seconds > 0 else 0.0,
            tokens_per_s=counted["tokens"] / seconds if seconds > 0 else 0.0,
            peak_memory_bytes=memory.peak_bytes,
            peak_memory_kind=memory.kind,
            engine=self.engine,
            batch_size=self.options.batch_size,
            experts_implementation=self.experts_implementation,
            finish_reasons=reasons,
        )
        return results, stats  # type: ignore[return-value]


def generate(
    model: nn.Module, tokenizer, prompts: Sequence[str | Prompt], options: GenerationOptions | None = None, **kw
) -> list[Completion]:
    """Completions for ``prompts`` (strings or ``Prompt``), in their order. ``kw`` go to ``GenerationOptions``."""
    if options is not None and kw:
        raise ValueError(f"pass either options or keyword options, not both (got {sorted(kw)})")
    completions, _ = BatchGenerator(model, tokenizer, options or GenerationOptions(**kw)).run(prompts, progress=False)
    return completions


def check_output_file(out_path: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> bool:
    """The rules for an output file of results, checked before any work: ``resume`` and ``overwrite`` exclude each
    other; a non-empty file needs one of them; a file this tool did not write (no writer marker beside it) is
    resumed only if every line is a complete record (it is never repaired). Returns whether the file has content.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume keeps --out, overwrite empties it")
    out = Path(out_path)
    if out.exists() and not out.is_file():
        raise FileExistsError(f"--out {str(out)!r} exists and is not a file")
    has_content = out.is_file() and out.stat().st_size > 0
    if has_content and not (resume or overwrite):
        raise FileExistsError(
            f"--out {str(out)!r} already has results; pass --resume to skip them and continue, or --overwrite"
        )
    if resume and out.is_file() and not writer_marker(out).exists():
        completed_ids(out, truncate_partial=False)
    return has_content


def generate_file(
    model: nn.Module,
    tokenizer,
    prompts_path: str | os.PathLike,
    out_path: str | os.PathLike,
    options: GenerationOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> GenerationStats:
    """Generate for every valid line of ``prompts_path`` and append the results to ``out_path`` in order.

    An existing non-empty ``out_path`` is refused unless ``resume`` (skip its ids, append the rest) or
    ``overwrite`` (start it again) is set.
    """
    out = Path(out_path)
    has_content = check_output_file(out, resume, overwrite)
    with exclusive_output(out):
        prompts, bad = read_prompts(prompts_path)
        if not prompts:
            raise ValueError(f"no valid prompt in {str(prompts_path)!r} ({len(bad)} malformed line(s))")
        done = completed_ids(out, truncate_partial=writer_marker(out).exists()) if resume else set()
        todo = [p for p in prompts if _id_key(p.id) not in done]
        if done:
            logger.info("resume: %d id(s) already in %s, %d prompt(s) to go", len(prompts) - len(todo), out, len(todo))
        generator = BatchGenerator(model, tokenizer, options)
        remove_stale_temporaries(out)
        if overwrite and has_content:
            # The old results stay in place until the new file is complete, then the new one replaces them.
            with atomic_output_file(out) as tmp, jsonl_appender(tmp, mark=False) as write:
                writer = OrderedWriter(write, len(todo))
                _, stats = generator.run(todo, on_result=lambda i, c: writer.add(i, c.to_record()), progress=progress)
            mark_as_ours(out)
        else:
            with jsonl_appender(out) as write:
                writer = OrderedWriter(write, len(todo))
                _, stats = generator.run(todo, on_result=lambda i, c: writer.add(i, c.to_record()), progress=progress)
    stats.skipped_bad_lines = len(bad)
    stats.skipped_already_done = len(prompts) - len(todo)
    return stats
