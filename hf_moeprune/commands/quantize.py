"""``hf-moeprune quantize MODEL OUTPUT_DIR --scheme int4|int8|nf4 [--format auto|compressed-tensors|hf_moeprune]``.

Two output formats:

- ``compressed-tensors`` (``pack-quantized``, W4A16 for int4 / W8A16 for int8): what vLLM and SGLang serve,
  and what stock transformers loads with the ``compressed-tensors`` package, without hf_moeprune. It needs
  a stock architecture (every MoE layer keeps the same expert count) whose experts transformers writes per
  expert; see ``compressed_tensors_export``.
- ``hf_moeprune``: packed tensors of any rank, fused experts included, any per-layer expert counts, also nf4.
  It loads only where hf_moeprune is installed (its transformers quantizer), elsewhere it fails loudly.

``auto`` (the default) writes compressed-tensors when it can, else hf_moeprune and says why.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS = ("auto", "compressed-tensors", "hf_moeprune")


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
        from hf_moeprune.quantization.compressed_tensors_export import SCHEME_FOR
        from hf_moeprune.quantization.schemes import get_scheme

        get_scheme(self.scheme)  # ValueError naming the scheme and the known ones, before anything is loaded
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}; accepted: {list(FORMATS)}")
        if self.format == "compressed-tensors" and self.scheme not in SCHEME_FOR:
            raise ValueError(
                f"scheme={self.scheme!r} has no compressed-tensors form; use --scheme {' or '.join(SCHEME_FOR)} "
                "or --format hf_moeprune"
            )


def _early_layout_problem(model: str) -> str | None:
    """A reason, read from the config alone, why the model cannot be written as compressed-tensors."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None  # from_pretrained of the model reports it properly
    counts = getattr(config, "experts_per_layer", None)
    if counts is not None and len({c for c in counts if c is not None}) > 1:
        return (
            f"its MoE layers keep different expert counts ({counts}), which no stock architecture, hence no "
            "serving engine, represents"
        )
    return None


def main(argv: Sequence[str]) -> int:
    from transformers import AutoModelForCausalLM

    from hf_moeprune.commands._parsing import parse_args, positionals_to_flags
    from hf_moeprune.commands._shared import copy_tokenizer
    from hf_moeprune.quantization.compressed_tensors_export import (
        CompressedTensorsExportConfig,
        UnsupportedLayoutError,
        export_compressed_tensors,
    )
    from hf_moeprune.quantization.config import QuantizationConfig
    from hf_moeprune.quantization.quantizer import model_size_bytes, quantize, weight_files_size_bytes
    from hf_moeprune.utils import atomic_output_dir

    try:
        argv = positionals_to_flags(argv, ("--model", "--output_dir"))
        (args,) = parse_args((QuantizeCLIArguments,), argv, prog="hf-moeprune quantize")
        config = QuantizationConfig(
            scheme=args.scheme, group_size=args.group_size, include_lm_head=args.include_lm_head
        )
        ct_config = None
        if args.format != "hf_moeprune" and args.scheme in ("int4", "int8"):
            ct_config = CompressedTensorsExportConfig(
                scheme=args.scheme,
                group_size=args.group_size if args.scheme == "int4" else None,
                include_lm_head=args.include_lm_head,
            )
        problem = _early_layout_problem(args.model) if ct_config is not None else None
        if problem and args.format == "compressed-tensors":
            raise ValueError(f"--format compressed-tensors: {args.model!r} cannot be written so: {problem}")
        if problem:
            logger.warning("writing the hf_moeprune format, not compressed-tensors: %s", problem)
            ct_config = None
    except ValueError as exc:
        raise SystemExit(f"hf-moeprune quantize: {exc}") from None
    written = "hf_moeprune"
    # entered first so that a non-empty output_dir is refused before the model is loaded
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        model = AutoModelForCausalLM.from_pretrained(args.model)
        before = model_size_bytes(model)
        if ct_config is not None:
            try:
                summary = export_compressed_tensors(model, tmp, ct_config)
                written = f"compressed-tensors {summary.scheme}"
            except UnsupportedLayoutError as exc:
                if args.format == "compressed-tensors":
                    raise SystemExit(f"hf-moeprune quantize: --format compressed-tensors: {exc}") from None
                logger.warning("writing the hf_moeprune format, not compressed-tensors: %s", exc)
                shutil.rmtree(tmp)
                Path(tmp).mkdir()
        if written == "hf_moeprune":
            quantize(model, config)
            model.save_pretrained(tmp)
        copy_tokenizer(args.model, tmp)
    on_disk = weight_files_size_bytes(args.output_dir)
    logger.info("saved %s-quantized model (%s format) to %s", args.scheme, written, args.output_dir)
    print(f"format: {written}")
    print(f"{'':<22}{'bytes':>14}")
    print(f"{'in memory before':<22}{before:>14,}")
    print(f"{'weight files on disk':<22}{on_disk:>14,}  ({on_disk / before:.3f})")
    return 0
