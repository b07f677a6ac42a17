"""Finishing a completion: EOS, stop-string and length rules (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

FINISH_REASONS = ("eos", "stop", "length")


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
    """(text, token ids used, finish reason) of one sequence, by the finish rules of ``hf_moeprune.inference``."""
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
