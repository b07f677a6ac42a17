"""Loading a checkpoint with the class its family needs, and carrying its processor along.

A vision-language MoE family (``qwen3_vl_moe``, ``glm4v_moe``, ...) loads with ``AutoModelForImageTextToText``: its
adapter names that Auto class. ``AutoModelForCausalLM`` refuses most of them, and where transformers maps the
model_type to a text-only causal LM as well (``qwen3_5_moe``) it would load the language model alone and drop the
vision tower, so a pruned or quantized output would silently lose it. Every command, and every library path that
loads a model by name (streaming surgery, layer-wise calibration, compression, distillation, LoRA merging), resolves
the class here, from ``config.json`` alone, before any weight is read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_AUTO_CLASS = "AutoModelForCausalLM"
# Parts of a processor that are saved one by one when the processor as a whole cannot be loaded (e.g. a
# Qwen3-VL processor, whose video processor needs torchvision). Tried in this order; each is optional.
PROCESSOR_PARTS = ("AutoTokenizer", "AutoImageProcessor", "AutoVideoProcessor")


def auto_class_name(config: Any) -> str:
    """The name of the Auto class that loads ``config``'s model: its adapter's ``auto_class`` for a registered family
    (pruned ``moeprune_<family>`` and quantized checkpoints included); else the first Auto class whose transformers
    mapping (or the config's ``auto_map``) knows the model_type; else ``AutoModelForCausalLM``, whose own error then
    names what is wrong."""
    from hf_moeprune.adapters.base import ADAPTERS, AUTO_CLASS_MAPPINGS, auto_class_mapping
    from hf_moeprune.format.layout import base_model_type

    model_type = base_model_type(config)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type].auto_class
    for name in AUTO_CLASS_MAPPINGS:
        if model_type in auto_class_mapping(name):
            return name
    auto_map = getattr(config, "auto_map", None) or {}
    return next((name for name in AUTO_CLASS_MAPPINGS if name in auto_map), DEFAULT_AUTO_CLASS)


def auto_model_class(config: Any) -> type:
    """The transformers Auto class (``AutoModelForCausalLM``, ``AutoModelForImageTextToText``) for ``config``."""
    import transformers

    import hf_moeprune  # noqa: F401  (registers the pruned classes with the Auto classes)

    return getattr(transformers, auto_class_name(config))


def load_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """``AutoConfig`` of ``path`` with hf_moeprune's pruned configs registered."""
    from transformers import AutoConfig

    import hf_moeprune  # noqa: F401

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_model(path: str | os.PathLike, config=None, **kwargs: Any):
    """``from_pretrained`` of ``path`` with the Auto class its config names (``auto_model_class``); ``kwargs`` go to
    ``from_pretrained``. A quantized hf_moeprune checkpoint loads too (the quantizer is registered first)."""
    import contextlib

    with contextlib.suppress(ImportError):
        import hf_moeprune.quantization  # noqa: F401  (registers quant_method="hf_moeprune")
    if config is None:
        config = load_config(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    auto_class = auto_model_class(config)
    logger.debug("loading %s with %s", path, auto_class.__name__)
    return auto_class.from_pretrained(str(path), **kwargs)


def model_from_config(config, **kwargs: Any):
    """``from_config`` with the Auto class ``config`` names (random or meta weights: ``streaming.meta_skeleton``)."""
    return auto_model_class(config).from_config(config, **kwargs)


def save_processor(source: str | os.PathLike, folder: str | os.PathLike) -> list[str]:
    """Save ``source``'s processor into ``folder`` so that the output loads with it: the whole processor
    (``AutoProcessor``: tokenizer, image and video processors, chat template) when it loads, else each part of
    ``PROCESSOR_PARTS`` that loads. Returns the classes saved (empty: ``source`` has none, which is logged).

    A checkpoint without a tokenizer (a bare model folder) is not an error: the output then has none either."""
    import transformers

    saved: list[str] = []
    try:
        processor = transformers.AutoProcessor.from_pretrained(str(source))
    except (OSError, ValueError, KeyError, ImportError, TypeError) as exc:
        logger.info("no AutoProcessor from %s (%s); saving its parts", source, " ".join(str(exc).split())[:200])
    else:
        # AutoProcessor falls back to the tokenizer alone where it finds no processor class (a text model, or a
        # pruned moeprune_<family> folder whose processor files name none): the parts below then keep the rest
        if isinstance(processor, transformers.ProcessorMixin):
            processor.save_pretrained(str(folder))
            return [type(processor).__name__]
    for part in PROCESSOR_PARTS:
        try:
            loaded = getattr(transformers, part).from_pretrained(str(source))
        except (OSError, ValueError, KeyError, ImportError, TypeError) as exc:
            logger.info("no %s copied from %s: %s", part, source, " ".join(str(exc).split())[:200])
            continue
        loaded.save_pretrained(str(folder))
        saved.append(type(loaded).__name__)
    if not saved:
        logger.warning("%s has no tokenizer or processor; %s gets none", source, Path(folder).name)
    return saved
