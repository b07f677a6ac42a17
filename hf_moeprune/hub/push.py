"""Pushing a model folder to the Hub: token resolution, the files that go, the token-leak check, the push."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token

from hf_moeprune.format.safetensors_header import header_bytes
from hf_moeprune.hub.card import CARD_FILENAME, CardInfo, _check_repo_id, _require_text, write_model_card
from hf_moeprune.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload pruned MoE model (hf_moeprune)"
# Small text files that could hold a pasted token; weights are not scanned (large, and binary).
TEXT_SUFFIXES = {".json", ".md", ".py", ".txt", ".yaml", ".yml", ".cfg", ".toml", ".jinja", ".sh", ".ini"}
MAX_SCANNED_BYTES = 16 * 1024 * 1024


class MissingTokenError(ValueError):
    """No Hugging Face token could be found; raised before any request is made."""


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else what ``huggingface_hub.get_token()`` finds (HF_TOKEN, token file)."""
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise MissingTokenError("the token passed is empty; pass a Hugging Face access token with write permission")
    resolved = token or get_token()
    if not resolved:
        raise MissingTokenError(
            "no Hugging Face token found, so nothing was sent. Provide a token with write permission in one of "
            "these ways: pass token=... (CLI: --token), set the HF_TOKEN environment variable, or run "
            f"`hf auth login` (it stores the token in {constants.HF_TOKEN_PATH}). Create one at "
            "https://huggingface.co/settings/tokens"
        )
    return resolved


def _check_model_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is not a folder; pass the folder written by save_pretrained")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} holds no config.json; pass the folder written by save_pretrained, not a parent folder"
        )
    return path


# Never uploaded: a pickle of the TrainingArguments (other people would have to unpickle it to read it, and
# Trainer versions before issue 16 stored the Hub token in it).
EXCLUDED_FROM_PUSH = ("training_args.bin",)


def _files_to_push(folder: Path) -> dict[str, Path]:
    """``path in repo -> local path`` for every file of ``folder``, without hidden files and folders (temporary
    folders of interrupted runs, ``.cache``, ``.git``) and without ``EXCLUDED_FROM_PUSH``."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.name in EXCLUDED_FROM_PUSH:
            logger.warning("not uploading %s: a pickle of the training arguments, not part of the model", path)
            continue
        files[rel.as_posix()] = path
    return files


def _contains(path: Path, needle: bytes) -> bool:
    """Whether ``needle`` occurs in ``path``: in a safetensors file, in its JSON header (the rest is tensor
    data); in any other file (text, pickles, archives), anywhere, read in chunks."""
    with path.open("rb") as f:
        if path.suffix == ".safetensors":
            return needle in header_bytes(f, limit=MAX_SCANNED_BYTES)
        tail = b""
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if needle in tail + chunk:
                return True
            tail = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return False


def _refuse_token_in_files(files: dict[str, Path], token: str) -> None:
    """A token pasted into a config or notes file, or pickled into a binary one, would be published with it:
    stop before that happens."""
    needle = token.encode("utf-8")
    for path in files.values():
        if _contains(path, needle):
            raise ValueError(
                f"{str(path)!r} contains your Hugging Face access token; remove it before pushing (nothing was sent)"
            )


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
    *,
    card_info: CardInfo | None = None,
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the model folder to it, model card included; returns the repo URL.

    A missing README.md is generated first (from ``card_info`` when given). Every check (folder, repo id,
    token, offline mode, a token pasted in a text file) runs before the first request. The token is only
    handed to the client; it is never written to a file or a log. ``endpoint`` defaults to
    ``huggingface_hub.constants.ENDPOINT`` (the ``HF_ENDPOINT`` environment variable).
    """
    path = _check_model_folder(folder)
    _check_repo_id(repo_id)
    if revision is not None:
        _require_text(revision, "revision")
    _require_text(commit_message, "commit_message")
    if card_info is not None and (path / CARD_FILENAME).exists():
        raise ValueError(
            f"{str(path / CARD_FILENAME)!r} already exists, so card_info would be ignored; delete it to have the "
            "card regenerated, or pass card_info=None to push the existing card"
        )
    resolved = resolve_token(token)
    if constants.is_offline_mode():
        raise RuntimeError("offline mode is enabled (HF_HUB_OFFLINE=1); unset it to push to the Hub")
    files = _files_to_push(path)
    _refuse_token_in_files(files, resolved)

    from importlib.metadata import PackageNotFoundError, version

    from huggingface_hub import CommitOperationAdd

    try:
        library_version = version("hf_moeprune")
    except PackageNotFoundError:
        library_version = "unknown"
    with tempfile.TemporaryDirectory(prefix="hf_moeprune-card-") as staging:
        generated = {}
        if not (path / CARD_FILENAME).exists():
            # Rendered outside the model folder and copied in only after the upload succeeded: a failed push
            # leaves the folder exactly as it was.
            write_model_card(path, card_info, repo_id=repo_id, overwrite=True, destination=staging)
            generated = {p.name: p for p in Path(staging).iterdir() if not p.name.startswith(".")}
        api = HfApi(
            endpoint=endpoint or constants.ENDPOINT,
            token=resolved,
            library_name="hf_moeprune",
            library_version=library_version,
        )
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != constants.DEFAULT_REVISION:
            # the commit needs the branch to exist.
            api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True, repo_type="model")
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local))
            for name, local in {**files, **generated}.items()
        ]
        commit = api.create_commit(
            repo_id=repo_url.repo_id,
            operations=operations,
            commit_message=commit_message,
            revision=revision,
            repo_type="model",
        )
        for name, staged in generated.items():
            atomic_write_bytes(path / name, staged.read_bytes())
    logger.info("pushed %s to %s (commit %s)", path, repo_url, commit.oid)
    return str(repo_url)
