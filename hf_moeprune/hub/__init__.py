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

from collections.abc import Sequence
from dataclasses import dataclass, field

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


@dataclass
class PushCLIArguments:
    path: str = field(metadata={"help": "model folder written by save_pretrained (positional PATH also works)"})
    repo_id: str = field(metadata={"help": "Hub repo id, 'namespace/name' (positional REPO_ID also works)"})
    private: bool = field(default=False, metadata={"help": "create the repo as private (ignored if it exists)"})
    token: str | None = field(
        default=None,
        metadata={
            "help": "Hub token; prefer the HF_TOKEN environment variable or `hf auth login`, "
            "a flag is visible in the shell history and process list"
        },
    )
    commit_message: str = field(default=DEFAULT_COMMIT_MESSAGE, metadata={"help": "commit message"})
    revision: str | None = field(default=None, metadata={"help": "branch to push to (created if missing)"})
    base_model: str | None = field(default=None, metadata={"help": "card: Hub id of the model that was pruned"})
    method: str | None = field(default=None, metadata={"help": "card: pruning method"})
    criterion: str | None = field(default=None, metadata={"help": "card: expert importance criterion"})
    license: str | None = field(default=None, metadata={"help": "card: license id, e.g. apache-2.0"})


def _positionals_to_flags(argv: Sequence[str]) -> list[str]:
    """``PATH REPO_ID`` -> ``--path PATH --repo_id REPO_ID``."""
    from hf_moeprune.utils import positionals_to_flags

    return positionals_to_flags(argv, ("--path", "--repo_id"))


def push_main(argv: Sequence[str]) -> int:
    """``hf-moeprune push PATH REPO_ID [--private] [--token ...]``."""
    from hf_moeprune.utils import parse_args

    (args,) = parse_args((PushCLIArguments,), _positionals_to_flags(argv), prog="hf-moeprune push")
    card_fields = {k: getattr(args, k) for k in ("base_model", "method", "criterion", "license")}
    try:
        card_info = CardInfo(**card_fields) if any(v is not None for v in card_fields.values()) else None
    except ValueError as exc:
        raise SystemExit(f"hf-moeprune push: {exc}") from None
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = push_to_hub(
            args.path,
            args.repo_id,
            private=args.private,
            token=args.token,
            commit_message=args.commit_message,
            revision=args.revision,
            card_info=card_info,
        )
    except (ValueError, OSError, RuntimeError, HfHubHTTPError) as exc:
        # a clean one-line message instead of a traceback; none of these messages holds the token
        raise SystemExit(f"hf-moeprune push: {exc}") from None
    print(f"pushed {args.path} -> {url}")
    return 0
