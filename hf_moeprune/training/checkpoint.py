"""The trainer's pruning state on disk, without pickle, and how a resume tells complete checkpoints from partial ones.

A checkpoint folder may come from anywhere (a colleague, the Hub), so nothing in it is unpickled: the
pruning state is a safetensors file for its tensors plus a JSON file for everything else, with each
tensor replaced by a ``{"__tensor__": name}`` reference. The JSON file is written last and records the
size and SHA-256 of the tensor file, so a state cut short by a kill, or a tensor file from another run,
is recognised instead of being loaded.

The trainer writes this state *before* ``Trainer`` writes ``trainer_state.json``, which Trainer writes
after the weights, optimizer and RNG files. A checkpoint is therefore complete when both
``trainer_state.json`` parses and the pruning state validates (``checkpoint_problem``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_moeprune.utils import atomic_output_file

logger = logging.getLogger(__name__)

STATE_TENSORS = "moeprune_state.safetensors"
STATE_JSON = "moeprune_state.json"
LEGACY_STATE_FILE = "moeprune_state.pt"  # written by earlier versions (a pickle); only read with weights_only=True
STATE_FORMAT = 1
TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME (5.24)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the folder and the file."""


# -- encoding: nested containers of tensors and JSON scalars <-> (JSON, {name: tensor}) ------------------------
def _encode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        # JSON has no NaN/inf; losses and scores can be either
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        # integer layer keys (and any other scalar keys) keep their type
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"pruning state holds a {type(obj).__name__}, which the checkpoint format cannot store")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _replace_into(folder: Path, name: str, write) -> None:
    with atomic_output_file(folder / name) as tmp:
        write(tmp)


def save_pruning_state(folder: str | os.PathLike, state: dict) -> None:
    """Write ``state`` into ``folder`` as safetensors + JSON; the JSON (written last) completes it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    (folder / STATE_JSON).unlink(missing_ok=True)  # a kill below leaves no JSON, i.e. an incomplete state
    _replace_into(folder, STATE_TENSORS, lambda tmp: save_file(tensors, tmp))
    record = {
        "format": STATE_FORMAT,
        "tensors": {"file": STATE_TENSORS, "bytes": (folder / STATE_TENSORS).stat().st_size,
                    "sha256": _sha256(folder / STATE_TENSORS)},
        "state": encoded,
    }  # fmt: skip
    _replace_into(folder, STATE_JSON, lambda tmp: Path(tmp).write_text(json.dumps(record)))


def load_pruning_state(folder: str | os.PathLike) -> dict:
    """The pruning state saved in checkpoint ``folder``; ``CheckpointError`` naming the file if it is missing,
    cut short or inconsistent. A state from an earlier version (``moeprune_state.pt``) is read with
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers."""
    folder = Path(folder)
    meta_path = folder / STATE_JSON
    if not meta_path.is_file():
        legacy = folder / LEGACY_STATE_FILE
        if legacy.is_file():
            return _load_legacy(legacy)
        raise CheckpointError(
            f"checkpoint {str(folder)!r} has no pruning state ({STATE_JSON}): it was not written completely "
            "(interrupted run) or not by MoEPruneTrainer"
        )
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
            raise ValueError(f"format {record.get('format') if isinstance(record, dict) else None!r} is not "
                             f"{STATE_FORMAT}")  # fmt: skip
        expected = record["tensors"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(meta_path)!r} is not a readable pruning state ({exc})") from None
    tensors_path = folder / STATE_TENSORS
    if not tensors_path.is_file():
        raise CheckpointError(f"{str(tensors_path)!r} is missing (the pruning state is incomplete)")
    if tensors_path.stat().st_size != expected.get("bytes") or _sha256(tensors_path) != expected.get("sha256"):
        raise CheckpointError(
            f"{str(tensors_path)!r} does not match {STATE_JSON} (size or SHA-256 differ): cut short or from another run"
        )
    try:
        tensors = load_file(str(tensors_path))
        return _decode(record["state"], tensors)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(meta_path)!r}: the pruning state cannot be read ({exc})") from None


def _load_legacy(path: Path) -> dict:
    import pickle

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{str(path)!r} cannot be loaded safely (only tensors and plain containers are accepted; "
            f"nothing in it was run): {first}"
        ) from None
    if not isinstance(state, dict) or "budgets" not in state:
        raise CheckpointError(f"{str(path)!r} is not a pruning state (no 'budgets')")
    logger.warning("%s: pruning state in the old pickle format, read with weights_only=True", path)
    return state


def checkpoint_problem(folder: str | os.PathLike, needs_pruning_state: bool = True) -> str | None:
    """Why ``folder`` cannot be resumed from, or ``None`` when it is a complete checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"checkpoint {str(folder)!r} does not exist or is not a folder"
    trainer_state = folder / TRAINER_STATE
    try:
        json.loads(trainer_state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"checkpoint {str(folder)!r} has no {TRAINER_STATE}: it was not written completely"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{str(trainer_state)!r} is cut short or not JSON ({exc})"
    if needs_pruning_state:
        try:
            load_pruning_state(folder)
        except CheckpointError as exc:
            return str(exc)
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike, needs_pruning_state: bool = True) -> Path | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that is complete; each newer partial one is
    skipped with a warning naming what is wrong with it."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path, needs_pruning_state)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint: %s", problem)
    return None
