"""The quantization config: what to quantize and how. It is also what ``config.json`` carries.

``QuantizationConfig`` subclasses transformers' ``QuantizationConfigMixin`` with
``quant_method="hf_moeprune"``, so a saved model's ``config.json`` holds it under
``quantization_config`` and ``from_pretrained`` (after ``import hf_moeprune``) rebuilds the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_moeprune.quantization.schemes import get_scheme

QUANT_METHOD = "hf_moeprune"

# Tensors matching any of these (regex search on the full parameter name) stay in high precision.
# Routers decide which experts run, so a small error there changes the computation path, not just
# its values; they are also tiny. Embeddings are a lookup, not a matmul, and are skipped like in
# bitsandbytes/torchao. Biases, norms and DeepSeek's e_score_correction_bias (a buffer) are never
# candidates: only floating-point parameters of rank >= 2 whose name does not end in "bias" are. A vision-language
# model's vision tower gets anchored patterns of its own when it is quantized
# (quantizer.keep_encoders_in_high_precision).
DEFAULT_SKIP_PATTERNS: tuple[str, ...] = (
    r"(^|\.)gate\.",  # Mixtral/Qwen/OLMoE/DeepSeek router: mlp.gate.weight (HunYuan: mlp.gate.wg.weight)
    r"(^|\.)router\.",  # GPT-OSS router: mlp.router.weight (+ bias); GraniteMoE, Jamba: <block>.router.weight
    r"(^|\.)shared_expert_gate\.",  # Qwen2-MoE: sigmoid gate of the shared expert
    r"(^|\.)embed_tokens\.",
    # state-space / linear-attention internals (Jamba's Mamba, Qwen3-Next's gated DeltaNet): the decay
    # parameters, the step-size projection and the short causal convolution are small and feed exponentials
    # or recurrences, where a weight error compounds over the sequence; their in/out projections are quantized.
    r"(^|\.)A_log$",
    r"(^|\.)dt_proj\.",
    r"(^|\.)conv1d\.",
)
LM_HEAD_PATTERN = r"(^|\.)lm_head\."


@dataclass
class QuantizationConfig(QuantizationConfigMixin):
    """Weight-only quantization of a MoE model, fused 3D expert tensors included."""

    scheme: str = field(default="int8", metadata={"help": "quantization scheme, e.g. int8, nf4, int4"})
    group_size: int | None = field(
        default=None, metadata={"help": "values per scale (contiguous, flattened); None: the scheme's default"}
    )
    include_lm_head: bool = field(default=False, metadata={"help": "also quantize the LM head (not when tied)"})
    skip_patterns: list[str] = field(
        default_factory=lambda: list(DEFAULT_SKIP_PATTERNS),
        metadata={"help": "regexes; parameters whose full name matches one stay in high precision"},
    )
    quant_method: str = field(default=QUANT_METHOD, metadata={"help": "transformers' dispatch key; do not change"})

    def __post_init__(self):
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method={self.quant_method!r}; this config only handles {QUANT_METHOD!r}")
        scheme = get_scheme(self.scheme)
        if self.group_size is None:
            self.group_size = scheme.default_group_size
        scheme.check_group_size(self.group_size)
        if isinstance(self.skip_patterns, str) or not all(isinstance(p, str) for p in self.skip_patterns):
            raise ValueError(f"skip_patterns={self.skip_patterns!r}; expected a list of regex strings")
        self.skip_patterns = list(self.skip_patterns)
        for pattern in self.skip_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"skip pattern {pattern!r} is not a valid regex: {exc}") from None

    def effective_skip_patterns(self) -> list[str]:
        return self.skip_patterns if self.include_lm_head else [*self.skip_patterns, LM_HEAD_PATTERN]

    def is_skipped(self, parameter_name: str) -> bool:
        return any(re.search(p, parameter_name) for p in self.effective_skip_patterns())
