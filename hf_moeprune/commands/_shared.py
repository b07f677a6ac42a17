"""Checks and steps that several subcommands share (one implementation each)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

RESUME_LAST = ("last", "true", "True")


def check_output_dir(args, overwrite: bool, needs_pruning_state: bool = True) -> str | bool | None:
    """What to resume from (``resume_from_checkpoint`` resolved), after refusing a non-empty ``output_dir``
    that the run would mix its checkpoints and model into. Runs before anything is loaded or written."""
    from hf_moeprune.training.checkpoint import checkpoint_problem, last_complete_checkpoint

    out = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    if resume is not None and overwrite:
        raise ValueError("--resume_from_checkpoint and --overwrite exclude each other: resume continues output_dir")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {str(out)!r} exists and is not a folder")
    if resume in RESUME_LAST:
        found = last_complete_checkpoint(out, needs_pruning_state)
        if found is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume}: no complete checkpoint-N folder in {str(out)!r}"
            )
        return str(found)
    if resume is not None:
        problem = checkpoint_problem(resume, needs_pruning_state)
        if problem is not None:
            raise ValueError(f"--resume_from_checkpoint: {problem}")
        return resume
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".final-model.tmp")):
        if not overwrite:
            raise FileExistsError(
                f"output_dir {str(out)!r} is not empty; pass --resume_from_checkpoint last to continue its run, "
                "--overwrite to replace it, or choose another output_dir"
            )
        for old in sorted(out.glob("checkpoint-*")):
            if old.is_dir():
                shutil.rmtree(old)
                logger.warning("--overwrite: removed old checkpoint %s", old)
    return None
