"""Publishing: a model card for a pruned MoE model, and the push of the model folder to the Hugging Face Hub.

The card is rendered by ``huggingface_hub.ModelCard.from_template`` from the Jinja template
``model_cards/pruned_moe.md``: the YAML metadata comes from ``ModelCardData`` and the body from the
pruning fields of the saved config (``experts_per_layer``/``kept_expert_ids`` of the pruned format, or
``moeprune_provenance`` of a stock export). Quantization, distillation and evaluation figures are passed
in as typed records; a section whose record is absent is left out of the card, never filled in.

The push goes through the real ``huggingface_hub`` client (``HfApi.create_repo`` + ``upload_folder``),
so ``HF_ENDPOINT`` (or ``endpoint=``) points it at another Hub, a private one or a test stand-in.
"""

from __future__ import annotations

from hf_moeprune.hub.card import (
    CARD_FILENAME,
    CHECKPOINT_KINDS,
    DEFAULT_TEMPLATE,
    PLOT_FILENAME,
    REPO_ID_PLACEHOLDER,
    CardInfo,
    DistillationInfo,
    EvalFigure,
    QuantizationInfo,
    _check_repo_id,  # noqa: F401  (compress.py validates a repo id before it starts)
    build_model_card,
    checkpoint_kind,
    quantization_from_config,
    stored_parameter_count,
    write_model_card,
)
from hf_moeprune.hub.plots import plot_expert_counts
from hf_moeprune.hub.push import (
    DEFAULT_COMMIT_MESSAGE,
    EXCLUDED_FROM_PUSH,
    MissingTokenError,
    push_to_hub,
    resolve_token,
)

__all__ = [
    "CARD_FILENAME",
    "CHECKPOINT_KINDS",
    "DEFAULT_COMMIT_MESSAGE",
    "DEFAULT_TEMPLATE",
    "EXCLUDED_FROM_PUSH",
    "PLOT_FILENAME",
    "REPO_ID_PLACEHOLDER",
    "CardInfo",
    "DistillationInfo",
    "EvalFigure",
    "MissingTokenError",
    "QuantizationInfo",
    "build_model_card",
    "checkpoint_kind",
    "plot_expert_counts",
    "push_to_hub",
    "quantization_from_config",
    "resolve_token",
    "stored_parameter_count",
    "write_model_card",
]
