"""``hf-moeprune quantize MODEL OUTPUT_DIR --scheme int4|int8|nf4 [--format auto|compressed-tensors|hf_moeprune]``.

The formats and the ``auto`` rule are ``hf_moeprune.quantization.save``'s: compressed-tensors (vLLM, SGLang, stock
transformers) when the layout allows it, else hf_moeprune's own format (any layout, also nf4).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class QuantizeCLIArguments:
    model: str = field(metadata={"help": "model folder (or Hub id) of a full-precision MoE model"})
    output_dir: str = field(metadata={"help": "where to save the quantized model (must not exist or be empty)"})
    scheme: str = field(
        default="int8",
        metadata={"help": "int8 (compressed-tensors: W8A16 per channel), int4 (W4A16, group 128) or nf4 (hf_moeprune)"},
    )
    format: str = field(
        default="auto",
        metadata={"help": "auto | compressed-tensors (vLLM/SGLang/stock transformers) | hf_moeprune (any layout)"},
    )
    group_size: int | None = field(default=None, metadata={"help": "values per scale; default: the scheme's"})
    include_lm_head: bool = field(default=False, metadata={"help": "also quantize the LM head"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output_dir"})

    def __post_init__(self):
        from hf_moeprune.quantization.save import check_format
        from hf_moeprune.quantization.schemes import get_scheme

        get_scheme(self.scheme)  # ValueError naming the scheme and the known ones, before anything is loaded
        check_format(self.format, self.scheme, name="--format")


def main(argv: Sequence[str]) -> int:
    from hf_moeprune.commands._parsing import parse_args, positionals_to_flags
    from hf_moeprune.loading import load_model, save_processor
    from hf_moeprune.quantization.compressed_tensors_export import SCHEME_FOR, UnsupportedLayoutError
    from hf_moeprune.quantization.config import QuantizationConfig
    from hf_moeprune.quantization.quantizer import model_size_bytes, weight_files_size_bytes
    from hf_moeprune.quantization.save import save_quantized, saved_layout_problem
    from hf_moeprune.utils import atomic_output_dir

    try:
        argv = positionals_to_flags(argv, ("--model", "--output_dir"))
        (args,) = parse_args((QuantizeCLIArguments,), argv, prog="hf-moeprune quantize")
        QuantizationConfig(scheme=args.scheme, group_size=args.group_size, include_lm_head=args.include_lm_head)
        if args.format == "compressed-tensors" and args.scheme in SCHEME_FOR:
            problem = saved_layout_problem(args.model)
            if problem:
                raise ValueError(f"--format compressed-tensors: {args.model!r} cannot be written so: {problem}")
    except ValueError as exc:
        raise SystemExit(f"hf-moeprune quantize: {exc}") from None
    # entered first so that a non-empty output_dir is refused before the model is loaded
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        model = load_model(args.model)
        before = model_size_bytes(model)
        try:
            written = save_quantized(
                model, tmp, args.scheme, args.format, group_size=args.group_size, include_lm_head=args.include_lm_head
            )
        except UnsupportedLayoutError as exc:
            raise SystemExit(f"hf-moeprune quantize: --format compressed-tensors: {exc}") from None
        save_processor(args.model, tmp)
    on_disk = weight_files_size_bytes(args.output_dir)
    logger.info("saved %s-quantized model (%s format) to %s", args.scheme, written, args.output_dir)
    print(f"format: {written}")
    print(f"{'':<22}{'bytes':>14}")
    print(f"{'in memory before':<22}{before:>14,}")
    print(f"{'weight files on disk':<22}{on_disk:>14,}  ({on_disk / before:.3f})")
    return 0
