"""Throughput statistics of one generation run."""

from __future__ import annotations

from dataclasses import dataclass


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
