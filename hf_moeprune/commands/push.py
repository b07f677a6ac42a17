"""``hf-moeprune push PATH REPO_ID``: push a model folder (and its model card) to the Hub."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hf_moeprune.commands._parsing import parse_args, positionals_to_flags
from hf_moeprune.hub import DEFAULT_COMMIT_MESSAGE, CardInfo, push_to_hub


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
    return positionals_to_flags(argv, ("--path", "--repo_id"))


def main(argv: Sequence[str]) -> int:
    """``hf-moeprune push PATH REPO_ID [--private] [--token ...]``."""
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
