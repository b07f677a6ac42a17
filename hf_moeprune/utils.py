"""Small shared helpers: argument parsing for the CLIs and all-or-nothing output folders."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from hf_moeprune import compat

logger = logging.getLogger(__name__)


def positionals_to_flags(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """Map leading positional arguments to flags (HfArgumentParser only knows flags): with
    ``names=("--model", "--output_dir")``, ``MODEL OUT --x 1`` becomes ``--model MODEL --output_dir OUT --x 1``.
    A leading YAML recipe stays first; flags given as flags are left alone."""
    argv = list(argv)
    head = []
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        head, argv = [argv[0]], argv[1:]
    names = list(names)
    mapped = []
    while argv and names and not argv[0].startswith("-"):
        mapped += [names.pop(0), argv.pop(0)]
    return head + mapped + argv


def parse_args(dataclass_types: tuple[type, ...], argv: Sequence[str], prog: str):
    """Parse ``argv`` into ``dataclass_types`` with ``HfArgumentParser``.

    ``argv`` may be flags, a single YAML recipe (``recipe.yaml``), or a recipe followed by flags that
    override it (``recipe.yaml --learning_rate 1e-4``).
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, prog=prog)
    # An argument error prints one line (prog: error: ...), not the usage of every TrainingArguments flag.
    parser.print_usage = lambda file=None: None
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        import yaml

        recipe_path = Path(argv[0])
        if not recipe_path.is_file():
            parser.error(f"recipe {str(recipe_path)!r} does not exist")
        recipe = yaml.safe_load(recipe_path.read_text()) or {}
        if not isinstance(recipe, dict):
            parser.error(f"recipe {str(recipe_path)!r} must be a mapping of field: value, got {type(recipe).__name__}")
        known = {f for t in dataclass_types for f in t.__dataclass_fields__}
        unknown = sorted(set(recipe) - known)
        if unknown:
            parser.error(f"recipe {str(recipe_path)!r} has unknown field(s) {unknown}")
        parser.set_defaults(**recipe)
        argv = argv[1:]
        # fields required by the dataclass but given in the recipe are no longer required on the CLI
        for action in compat.parser_actions(parser):
            if action.dest in recipe:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the hidden ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` folders (or files) that runs killed while writing
    ``path`` left beside it (their process is gone); those of a live process are left alone. Returns them."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{path.name}.*"):
        rest = candidate.name[len(path.name) + 2 :]
        kind, _, tail = rest.partition("-")
        pid = tail.split("-", 1)[0]
        if kind == "tmp" and not pid.isdigit():
            # named by an earlier version (no process id): whether its run is alive cannot be told
            logger.warning("%s looks left by an interrupted run of an earlier version; remove it if no run uses it",
                           candidate)  # fmt: skip
            continue
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not path.exists():
            # killed between moving the old output aside and moving the new one in: the old one comes back
            os.replace(candidate, path)
            logger.warning("restored %s from %s left by an interrupted run (process %s)", path, candidate, pid)
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        logger.warning("removed %s left by an interrupted run (process %s)", candidate, pid)
        removed.append(candidate)
    return removed


def without_secrets(args):
    """A shallow copy of a ``TrainingArguments`` with every ``*_token`` field set to ``None``, to pickle into
    ``training_args.bin`` (Trainer's ``to_dict`` redacts them for logs, but the pickle keeps the object)."""
    import copy
    import dataclasses

    clean = copy.copy(args)
    for f in dataclasses.fields(args):
        if f.name.endswith("_token") and getattr(clean, f.name, None) is not None:
            setattr(clean, f.name, None)
    return clean


def check_output_folder(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output path that is a file, or a non-empty folder without ``overwrite``; the CLIs call it before
    loading anything, ``atomic_output_dir`` again when it starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {str(path)!r} is not empty; choose another or pass --overwrite (overwrite=True)"
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` only if the block succeeds.

    A failure leaves ``path`` exactly as it was. An existing non-empty ``path`` is refused unless
    ``overwrite`` is set, and even then it is only replaced once the new content is complete.
    """
    path = check_output_folder(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("atomic_output_dir.before_swap")
    backup = None
    if path.exists():
        backup = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, backup)
        fault_point("atomic_output_dir.old_moved")
    os.replace(tmp, path)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# Weight and index files of a saved model; an old one left beside a new model would be read with it.
_MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
)


def replace_model_files(staged: str | os.PathLike, folder: str | os.PathLike, marker: str = "config.json") -> None:
    """Move the model saved in ``staged`` into ``folder``, which may hold an older model beside other things
    (checkpoints, reports) that stay, so ``atomic_output_dir`` (which swaps the whole folder) does not fit.

    ``marker`` (the file loaders read first) is removed first and put back last: a kill in between leaves a
    folder that loaders refuse ("no config.json"), never a new config beside old weights or the reverse.
    """
    staged, folder = Path(staged), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in staged.iterdir()}
    if marker not in new:
        raise FileNotFoundError(f"{str(staged)!r} holds no {marker}; nothing to move into {str(folder)!r}")
    (folder / marker).unlink(missing_ok=True)
    fault_point("replace_model_files.marker_removed")
    stale = {p for pattern in _MODEL_FILE_PATTERNS for p in folder.glob(pattern) if p.name not in new}
    for path in stale:
        path.unlink()
    for name in sorted(new - {marker}):
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staged / name, target)
    fault_point("replace_model_files.before_marker")
    os.replace(staged / marker, folder / marker)
    shutil.rmtree(staged, ignore_errors=True)


FAULT_ENV = "HF_MOEPRUNE_FAULT"


def fault_point(name: str) -> None:
    """Fault injection for the crash-safety tests: ``HF_MOEPRUNE_FAULT=<name>`` kills this process with SIGKILL
    when it reaches the point ``name`` (``<name>@N``: the N-th time). A no-op otherwise."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    count = _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if count >= int(nth or 1):
        import signal

        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: dict[str, int] = {}
