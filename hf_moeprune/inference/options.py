"""How to generate: ``GenerationOptions``, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_moeprune.inference.engines import ENGINES, EXPERTS_IMPLEMENTATIONS


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
