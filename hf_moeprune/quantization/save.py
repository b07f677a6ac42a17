"""Quantize a model and write it in the format that fits it: what ``hf-moeprune quantize`` and ``compress`` share.

- ``compressed-tensors`` (``pack-quantized``, W4A16 for int4 / W8A16 for int8): what vLLM and SGLang serve,
  and what stock transformers loads with the ``compressed-tensors`` package, without hf_moeprune. It needs
  a stock architecture (every MoE layer keeps the same expert count) whose experts transformers writes per
  expert; see ``compressed_tensors_export``.
- ``hf_moeprune``: packed tensors of any rank, fused experts included, any per-layer expert counts, also nf4.
  It loads only where hf_moeprune is installed (its transformers quantizer), elsewhere it fails loudly.

``auto`` writes compressed-tensors when it can, else hf_moeprune, and logs why.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from hf_moeprune.quantization.compressed_tensors_export import (
    SCHEME_FOR,
    CompressedTensorsExportConfig,
    UnsupportedLayoutError,
    export_compressed_tensors,
)
from hf_moeprune.quantization.config import QuantizationConfig
from hf_moeprune.quantization.quantizer import quantize

logger = logging.getLogger(__name__)

FORMATS = ("auto", "compressed-tensors", "hf_moeprune")


def check_format(format: str, scheme: str, name: str = "format") -> None:
    """Refuse an unknown format, or a scheme that the explicitly requested compressed-tensors cannot hold."""
    if format not in FORMATS:
        raise ValueError(f"{name}={format!r}; accepted: {list(FORMATS)}")
    if format == "compressed-tensors" and scheme not in SCHEME_FOR:
        raise ValueError(
            f"scheme={scheme!r} has no compressed-tensors form; use scheme {' or '.join(SCHEME_FOR)}, "
            f"or {name} hf_moeprune"
        )


def layout_problem(config: Any) -> str | None:
    """A reason, read from the config alone (before any weight is loaded), why the model cannot be written as
    compressed-tensors; None when the config does not rule it out."""
    counts = config.get("experts_per_layer") if isinstance(config, dict) else getattr(config, "experts_per_layer", None)
    if counts is not None and len({c for c in counts if c is not None}) > 1:
        return (
            f"its MoE layers keep different expert counts ({counts}), which no stock architecture, hence no "
            "serving engine, represents"
        )
    return None


def saved_layout_problem(model: str | os.PathLike) -> str | None:
    """``layout_problem`` of the model at ``model`` (folder or Hub id), from its config alone: checked before any
    weight is loaded. None also when the config cannot be read (loading the model then reports that properly)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None
    return layout_problem(config)


def save_quantized(
    model: nn.Module,
    folder: str | os.PathLike,
    scheme: str,
    format: str = "auto",
    group_size: int | None = None,
    include_lm_head: bool = False,
) -> str:
    """Quantize the full-precision ``model`` with ``scheme`` and write it into the empty ``folder`` (the callers pass
    an ``atomic_output_dir``) as ``format``. ``group_size=None`` takes the format's default (compressed-tensors
    W4A16: 128, or what fits the widths; hf_moeprune: the scheme's). Returns what was written:
    ``"compressed-tensors W8A16"`` etc., or ``"hf_moeprune"`` (then ``model`` itself is quantized in place; the
    compressed-tensors path leaves it as it was). An explicit ``compressed-tensors`` that the model cannot take
    raises ``UnsupportedLayoutError``."""
    config = QuantizationConfig(scheme=scheme, group_size=group_size, include_lm_head=include_lm_head)
    check_format(format, scheme)
    if format != "hf_moeprune" and scheme in SCHEME_FOR:
        problem = layout_problem(model.config)
        if problem and format == "compressed-tensors":
            raise UnsupportedLayoutError(f"the model cannot be written as compressed-tensors: {problem}")
        if problem:
            logger.warning("writing the hf_moeprune format, not compressed-tensors: %s", problem)
        else:
            ct_config = CompressedTensorsExportConfig(
                scheme=scheme, group_size=group_size if scheme == "int4" else None, include_lm_head=include_lm_head
            )
            try:
                summary = export_compressed_tensors(model, folder, ct_config)
                return f"compressed-tensors {summary.scheme}"
            except UnsupportedLayoutError as exc:
                if format == "compressed-tensors":
                    raise
                logger.warning("writing the hf_moeprune format, not compressed-tensors: %s", exc)
                shutil.rmtree(folder)
                Path(folder).mkdir()
    quantize(model, config)
    model.save_pretrained(folder)
    return "hf_moeprune"
