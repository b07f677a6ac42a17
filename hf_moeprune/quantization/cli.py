"""``hf-moeprune quantize MODEL OUTPUT_DIR --scheme int8|nf4|int4 [--include-lm-head]``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class QuantizeCLIArguments:
    model: str = field(metadata={"help": "model folder (or Hub id) of a full-precision MoE model"})
    output_dir: str = field(metadata={"help": "where to save the quantized model (must not exist or be empty)"})
    scheme: str = field(default="int8", metadata={"help": "quantization scheme: int8, nf4 or int4"})
    group_size: int | None = field(default=None, metadata={"help": "values per scale; default: the scheme's"})
    include_lm_head: bool = field(default=False, metadata={"help": "also quantize the LM head"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output_dir"})

    def __post_init__(self):
        from hf_moeprune.quantization.schemes import get_scheme

        get_scheme(self.scheme)  # ValueError naming the scheme and the known ones, before anything is loaded


def quantize_main(argv: Sequence[str]) -> int:
    from transformers import AutoModelForCausalLM

    from hf_moeprune.quantization.config import QuantizationConfig
    from hf_moeprune.quantization.quantizer import model_size_bytes, quantize, weight_files_size_bytes
    from hf_moeprune.utils import atomic_output_dir, parse_args, positionals_to_flags

    try:
        argv = positionals_to_flags(argv, ("--model", "--output_dir"))
        (args,) = parse_args((QuantizeCLIArguments,), argv, prog="hf-moeprune quantize")
        config = QuantizationConfig(
            scheme=args.scheme, group_size=args.group_size, include_lm_head=args.include_lm_head
        )
    except ValueError as exc:
        raise SystemExit(f"hf-moeprune quantize: {exc}") from None
    # entered first so that a non-empty output_dir is refused before the model is loaded
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        model = AutoModelForCausalLM.from_pretrained(args.model)
        before = model_size_bytes(model)
        quantize(model, config)
        after = model_size_bytes(model)
        model.save_pretrained(tmp)
    on_disk = weight_files_size_bytes(args.output_dir)
    logger.info("saved %s-quantized model to %s", config.scheme, args.output_dir)
    print(f"{'':<22}{'bytes':>14}")
    print(f"{'in memory before':<22}{before:>14,}")
    print(f"{'in memory after':<22}{after:>14,}  ({after / before:.3f})")
    print(f"{'weight files on disk':<22}{on_disk:>14,}")
    return 0
