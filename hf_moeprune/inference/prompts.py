"""Prompt files: parsing and reading the JSONL prompts, and the ids an output file already holds (resume)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_moeprune.inference.output import writer_marker

logger = logging.getLogger(__name__)


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
