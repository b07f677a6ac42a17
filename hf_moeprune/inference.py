"""Batched generation for pruned, quantized or stock MoE causal LMs, from a JSONL file of prompts.

Pipeline: read and validate the prompt lines -> tokenize -> hand token lists to an engine -> turn
each finished token list into a completion (EOS / stop-string / length rules) -> write it.

Engines (registry ``ENGINES``):

* ``padded``: prompts are sorted by token length inside windows of ``sort_window`` consecutive
  prompts, cut into batches of ``batch_size``, left-padded and generated with ``model.generate`` and
  its KV cache. Works with anything that has ``generate`` (stock, pruned, quantized models).
* ``continuous``: transformers' continuous batching manager (paged KV cache, requests join and leave
  the running batch as they start and finish; ``batch_size`` caps the requests per step). Falls back
  to ``padded`` for every prompt it could not finish (model without continuous batching support,
  unsupported attention, a failed request).
* ``auto``: ``padded``, the faster of the two on CPU in ``benchmarks/inference_benchmark.py``; and the
  only one whose sampling is reproducible from a seed (continuous batching samples in a background
  thread whose batch composition depends on timing).

Output order rule: results are written in the prompts' original order. A result is appended (and
flushed) as soon as it and every result before it are done; later results wait in memory. Engines
finish prompts roughly in order (``padded`` processes a window at a time, starting with the batch that
holds the window's first prompt), so an interrupted run loses at most about one window of finished
work, and ``resume`` then skips every id already in the output file. Because the file is always an
in-order prefix, a resumed run completes it in the original order.

Finish rules, per prompt: an EOS token ends the completion (``finish_reason="eos"``, EOS not in the
text); else the earliest stop string ends it (``"stop"``, the text is cut just before the stop
string); else ``"length"`` (``max_new_tokens`` reached). ``tokens`` counts the generated tokens the
completion used, including the EOS token or the token that completed the stop string.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_moeprune import compat
from hf_moeprune.utils import fault_point, remove_stale_temporaries

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATIONS = ("auto", "keep", "eager", "grouped_mm", "batched_mm")
FINISH_REASONS = ("eos", "stop", "length")


# --------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class GenerationOptions:
    """How to generate. Sampling is reproducible for the same prompts, options and device with ``padded``."""

    max_new_tokens: int = field(default=64, metadata={"help": "maximum number of new tokens per prompt"})
    batch_size: int = field(default=16, metadata={"help": "prompts per batch (continuous: max requests per step)"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with --do_sample)"})
    top_k: int = field(default=0, metadata={"help": "sample among the top-k tokens; 0 disables (with --do_sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 disables (with --do_sample)"})
    seed: int = field(default=0, metadata={"help": "random seed for sampling"})
    stop: list[str] = field(
        default_factory=list, metadata={"help": "stop strings: the completion is cut before the first one"}
    )
    engine: str = field(default="auto", metadata={"help": "auto | padded | continuous"})
    experts_implementation: str = field(
        default="auto",
        metadata={"help": "auto (grouped_mm where the model supports it) | keep | eager | grouped_mm | batched_mm"},
    )
    sort_window: int = field(
        default=0,
        metadata={
            "help": "padded engine: sort prompts by length within windows of this many consecutive prompts; "
            "0 means 4 x batch_size. Larger windows pad less but hold more finished results before writing"
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if self.sort_window < 0:
            raise ValueError(f"sort_window={self.sort_window!r} must be >= 0 (0 means 4 x batch_size)")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be >= 0 (0 disables it)")
        known_engines = ("auto", *ENGINES)
        if self.engine not in known_engines:
            raise ValueError(f"engine={self.engine!r} is not known; choose one of {list(known_engines)}")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation={self.experts_implementation!r} is not known; "
                f"choose one of {list(EXPERTS_IMPLEMENTATIONS)}"
            )
        self.stop = list(self.stop or [])
        empty = [s for s in self.stop if not isinstance(s, str) or not s]
        if empty:
            raise ValueError(f"stop strings must be non-empty strings, got {empty!r} in stop={self.stop!r}")

    @property
    def window(self) -> int:
        return self.sort_window or 4 * self.batch_size


# --------------------------------------------------------------------------------------------------------------
# prompt files


@dataclass(frozen=True)
class Prompt:
    id: Any
    prompt: str
    line: int = 0  # 1-based line in the prompts file; 0 when not read from a file


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


def _id_key(value: Any) -> str:
    # 1 and "1" are different ids; JSON text tells them apart
    return json.dumps(value, sort_keys=True)


def parse_prompt_lines(lines: Iterable[str]) -> tuple[list[Prompt], list[BadLine]]:
    """Valid prompts and one ``BadLine`` per malformed line (blank lines are ignored).

    A line must be a JSON object with an ``id`` (string or integer, unique in the file) and a non-empty
    string ``prompt``.
    """
    prompts: list[Prompt] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            bad.append(BadLine(number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            bad.append(BadLine(number, f"expected a JSON object with 'id' and 'prompt', got {type(record).__name__}"))
            continue
        missing = [k for k in ("id", "prompt") if k not in record]
        if missing:
            bad.append(BadLine(number, f"missing field(s) {missing}"))
            continue
        pid, text = record["id"], record["prompt"]
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            bad.append(BadLine(number, f"'id' must be a string or an integer, got {pid!r}"))
            continue
        if not isinstance(text, str):
            bad.append(BadLine(number, f"'prompt' must be a string, got {type(text).__name__}"))
            continue
        if not text.strip():
            bad.append(BadLine(number, "empty prompt"))
            continue
        key = _id_key(pid)
        if key in seen:
            bad.append(BadLine(number, f"duplicate id {pid!r} (first on line {seen[key]})"))
            continue
        seen[key] = number
        prompts.append(Prompt(pid, text, number))
    return prompts, bad


def read_prompts(path: str | os.PathLike) -> tuple[list[Prompt], list[BadLine]]:
    """Read a prompts JSONL file; every bad line is logged with its line number, then a summary."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    with path.open(encoding="utf-8", errors="replace") as f:
        prompts, bad = parse_prompt_lines(f)
    for problem in bad:
        logger.warning("%s:%d: skipped: %s", path, problem.line, problem.reason)
    if bad:
        logger.warning(
            "%s: skipped %d malformed line(s) (lines %s); %d prompt(s) remain",
            path,
            len(bad),
            ", ".join(str(p.line) for p in bad),
            len(prompts),
        )
    return prompts, bad


def completed_ids(out_path: str | os.PathLike, truncate_partial: bool = True) -> set[str]:
    """Ids (as ``_id_key``) already in an output file, for ``resume``.

    A last line cut short by an interrupted write is removed from the file when ``truncate_partial`` (it is
    this tool's own partial write; ``generate_file`` passes whether the file carries its writer marker);
    any other unreadable line means the file is not ours and is refused.
    """
    path = Path(out_path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    done: set[str] = set()
    good_end = 0
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        if not raw.strip():
            good_end += len(raw) + (0 if is_last else 1)
            continue
        try:
            record = json.loads(raw)
            done.add(_id_key(record["id"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            if is_last and not truncate_partial:
                raise ValueError(
                    f"cannot resume: {str(path)!r} line {number} is not an output record ({exc}) and the file was "
                    f"not written by hf-moeprune generate (no {writer_marker(path).name} beside it); nothing was "
                    "changed: choose another --out, or --overwrite"
                ) from None
            if is_last:
                logger.warning("%s:%d: dropping a partial last line left by an interrupted run", path, number)
                with path.open("r+b") as f:
                    f.truncate(good_end)
                break
            raise ValueError(
                f"cannot resume: {str(path)!r} line {number} is not an output record ({exc}); "
                "choose another --out or remove the file"
            ) from None
        good_end += len(raw) + (0 if is_last else 1)
    return done


def writer_marker(out_path: str | os.PathLike) -> Path:
    """The hidden file beside an output that says this tool writes it (``.NAME.hf-moeprune``)."""
    out = Path(out_path)
    return out.with_name(f".{out.name}.hf-moeprune")


def mark_as_ours(out_path: str | os.PathLike) -> None:
    marker = writer_marker(out_path)
    if not marker.exists():
        marker.write_text(json.dumps({"writer": "hf-moeprune generate", "output": Path(out_path).name}) + "\n")


@contextlib.contextmanager
def exclusive_output(out_path: str | os.PathLike) -> Iterator[None]:
    """Holds an advisory lock on ``out_path`` (``.NAME.lock`` beside it) for the block; a second writer of the
    same output is refused with ``FileExistsError`` instead of interleaving its lines. The kernel drops the
    lock when its process dies, so a killed run never blocks the next one."""
    import fcntl

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.with_name(f".{out.name}.lock")
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(
                f"--out {str(out)!r} is being written by another process (lock {str(lock_path)!r} is held); "
                "wait for it or choose another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class OrderedWriter:
    """Writes results in index order as soon as every earlier index is done; holds later ones meanwhile."""

    def __init__(self, write: Callable[[dict], None], total: int):
        self._write = write
        self._total = total
        self._held: dict[int, dict] = {}
        self.next_index = 0

    def add(self, index: int, record: dict) -> None:
        if not 0 <= index < self._total or index < self.next_index or index in self._held:
            raise ValueError(f"result index {index} is out of range [0, {self._total}) or was already given")
        self._held[index] = record
        while self.next_index in self._held:
            self._write(self._held.pop(self.next_index))
            self.next_index += 1

    @property
    def held(self) -> int:
        return len(self._held)


@contextlib.contextmanager
def jsonl_appender(path: str | os.PathLike, mark: bool = True) -> Iterator[Callable[[dict], None]]:
    """Yields ``write(record)``: one line per record, flushed at once so an interruption keeps it. With
    ``mark``, the file gets its writer marker first (``writer_marker``), so ``resume`` knows it may repair it."""
    if mark:
        mark_as_ours(path)
    with Path(path).open("a", encoding="utf-8") as f:

        def write(record: dict) -> None:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            fault_point("generate.record")

        yield write


# --------------------------------------------------------------------------------------------------------------
# finishing a completion


@dataclass
class Completion:
    id: Any
    prompt: str
    completion: str
    tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list, repr=False)  # the ``tokens`` generated ids

    def to_record(self) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "completion": self.completion,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
        }


def _first_stop(text: str, stops: Sequence[str]) -> int:
    positions = [p for p in (text.find(s) for s in stops) if p >= 0]
    return min(positions) if positions else -1


def finish_completion(
    generated: Sequence[int], eos_ids: Iterable[int], decode: Callable[[list[int]], str], stops: Sequence[str]
) -> tuple[str, list[int], str]:
    """(text, token ids used, finish reason) of one generated sequence, by the module's finish rules."""
    generated = [int(t) for t in generated]
    eos = set(eos_ids)
    end = next((i for i, t in enumerate(generated) if t in eos), None)
    body = generated if end is None else generated[:end]
    text = decode(body)
    cut = _first_stop(text, stops) if stops else -1
    if cut >= 0:
        # smallest prefix whose text already shows a stop string: that token completed it
        lo, hi = 1, len(body)
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(decode(body[:mid]), stops) >= 0:
                hi = mid
            else:
                lo = mid + 1
        return text[:cut], body[:lo], "stop"
    if end is not None:
        return text, generated[: end + 1], "eos"
    return text, generated, "length"


# --------------------------------------------------------------------------------------------------------------
# engines


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


# --------------------------------------------------------------------------------------------------------------
# model preparation and measurements


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def set_experts_implementation(model: nn.Module, name: str) -> str | None:
    """Select the fused-experts kernel; returns the one in use (None when the model has no such setting).

    ``auto`` picks ``grouped_mm``: one grouped matmul over all experts, several times faster than the
    per-expert python loop (``eager``) at decoding batch sizes on CPU (benchmarks/inference_benchmark.py).
    Models without the setting (a quantizer's own expert modules, remote code) are left as they are.
    """
    if name not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"experts implementation {name!r} is not known; choose one of {list(EXPERTS_IMPLEMENTATIONS)}")
    config = getattr(model, "config", None)
    current = compat.experts_implementation(config)
    if name == "keep" or not hasattr(model, "set_experts_implementation"):
        return current
    wanted = "grouped_mm" if name == "auto" else name
    try:
        model.set_experts_implementation(wanted)
    except (ValueError, RuntimeError, ImportError, AttributeError) as exc:
        if name != "auto":
            raise ValueError(f"experts implementation {wanted!r} is not available for this model: {exc}") from exc
        logger.info("keeping experts implementation %r (%s)", current, exc)
    return compat.experts_implementation(config)


class PeakMemory:
    """Peak memory over a block: CUDA max allocated bytes, or on CPU the sampled peak RSS of this process.

    ``resource.ru_maxrss`` is the whole process's lifetime peak, so a sampler thread gives the peak of
    this block alone; ru_maxrss is kept as a lower bound in case a spike fell between two samples.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.01):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss())


@dataclass
class GenerationStats:
    """Throughput of one run. ``generated_tokens`` sums each completion's ``tokens`` (what the outputs
    used); ``seconds`` covers generation only (not model loading or reading the prompts)."""

    prompts: int
    generated_tokens: int
    seconds: float
    prompts_per_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    peak_memory_kind: str
    engine: str
    batch_size: int
    experts_implementation: str | None
    finish_reasons: dict[str, int]
    skipped_bad_lines: int = 0
    skipped_already_done: int = 0

    def summary(self) -> str:
        rows = [
            ("prompts", f"{self.prompts}"),
            ("generated tokens", f"{self.generated_tokens}"),
            ("seconds", f"{self.seconds:.2f}"),
            ("prompts/s", f"{self.prompts_per_s:.2f}"),
            ("generated tokens/s", f"{self.tokens_per_s:.1f}"),
            (f"peak memory ({self.peak_memory_kind})", f"{self.peak_memory_bytes / 2**20:.1f} MiB"),
            ("engine", f"{self.engine} (batch size {self.batch_size}, experts {self.experts_implementation})"),
            ("finish reasons", ", ".join(f"{k} {v}" for k, v in sorted(self.finish_reasons.items())) or "-"),
            ("skipped bad lines", f"{self.skipped_bad_lines}"),
            ("skipped (already in --out)", f"{self.skipped_already_done}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# --------------------------------------------------------------------------------------------------------------
# the generator


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
    """Generates completions for many prompts with one model; see the module docstring for the rules."""

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
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
            os.close(fd)
            try:
                with jsonl_appender(tmp, mark=False) as write:
                    writer = OrderedWriter(write, len(todo))
                    _, stats = generator.run(
                        todo, on_result=lambda i, c: writer.add(i, c.to_record()), progress=progress
                    )
                os.replace(tmp, out)
            finally:
                Path(tmp).unlink(missing_ok=True)
            mark_as_ours(out)
        else:
            with jsonl_appender(out) as write:
                writer = OrderedWriter(write, len(todo))
                _, stats = generator.run(todo, on_result=lambda i, c: writer.add(i, c.to_record()), progress=progress)
    stats.skipped_bad_lines = len(bad)
    stats.skipped_already_done = len(prompts) - len(todo)
    return stats


# --------------------------------------------------------------------------------------------------------------
# command line


@dataclass
class GenerateArguments:
    model: str = field(metadata={"help": "model folder or Hub id (a pruned, quantized or stock MoE causal LM)"})
    prompts: str = field(metadata={"help": 'JSONL file, one {"id": ..., "prompt": ...} per line'})
    out: str = field(metadata={"help": "JSONL file the results are appended to, one line per prompt, in order"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or id (default: the model's)"})
    resume: bool = field(default=False, metadata={"help": "skip prompts whose id is already in --out"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace an existing --out (kept until the new results are complete)"}
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu) | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (as saved) | float32 | bfloat16 | float16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own modeling code"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    stats_json: str | None = field(default=None, metadata={"help": "also write the throughput summary as JSON"})

    def __post_init__(self) -> None:
        dtypes = ("auto", "float32", "bfloat16", "float16")
        if self.dtype not in dtypes:
            raise ValueError(f"--dtype {self.dtype!r} is not known; choose one of {list(dtypes)}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device {self.device!r} is not known; use auto, cpu, cuda or cuda:N")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")


def load_model_and_tokenizer(args: GenerateArguments):
    """The model (pruned models load through ``import hf_moeprune``'s Auto registration) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_moeprune  # noqa: F401  (registers the pruned-model classes with the Auto classes)

    with contextlib.suppress(ImportError):
        import hf_moeprune.quantization  # noqa: F401  (registers quant_method="hf_moeprune" for from_pretrained)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    return model, tokenizer


def generate_main(argv: Sequence[str]) -> int:
    """``hf-moeprune generate [MODEL] --prompts P --out O [options]``; a leading MODEL means ``--model MODEL``."""
    from hf_moeprune.utils import parse_args

    argv = list(argv)
    if argv and not argv[0].startswith("-") and not argv[0].endswith((".yaml", ".yml")):
        argv = ["--model", argv[0], *argv[1:]]
    try:
        args, options = parse_args((GenerateArguments, GenerationOptions), argv, prog="hf-moeprune generate")
    except ValueError as exc:
        raise SystemExit(f"hf-moeprune generate: {exc}") from None
    out = Path(args.out)
    if out.is_file() and out.stat().st_size > 0 and not (args.resume or args.overwrite):
        raise SystemExit(f"--out {args.out!r} already has results; pass --resume to continue it, or --overwrite")
    if not Path(args.prompts).is_file():
        raise SystemExit(f"--prompts {args.prompts!r} does not exist")
    prompts, _ = read_prompts(args.prompts)  # a file without one valid prompt fails before the model loads
    if not prompts:
        raise SystemExit(f"hf-moeprune generate: --prompts {args.prompts!r} holds no valid prompt")
    if args.resume and out.is_file() and not writer_marker(out).exists():
        completed_ids(out, truncate_partial=False)  # a file this tool did not write is refused, not repaired
    with exclusive_output(out):  # fail fast when another process writes --out; generate_file locks again
        pass
    model, tokenizer = load_model_and_tokenizer(args)
    try:
        stats = generate_file(
            model,
            tokenizer,
            args.prompts,
            args.out,
            options,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=args.progress,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise SystemExit(f"hf-moeprune generate: {exc}") from None
    print(stats.summary())
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(asdict(stats), indent=2) + "\n")
    return 0
