"""Writing results: the writer marker, the exclusive-output lock, the in-order writer and the JSONL appender."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from hf_moeprune.utils import fault_point


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
