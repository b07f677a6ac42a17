"""The training arguments every trainer test and multi-process script starts from: a quiet, deterministic CPU run
(no reports, no checkpoints, no progress bars, fixed seeds). Each caller names only the fields its check is about."""

from pathlib import Path

import torch
from datasets import Dataset

from hf_moeprune.training import MoEPruneArguments

QUIET_CPU_RUN = dict(
    per_device_train_batch_size=4,
    learning_rate=2e-3,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    seed=0,
    data_seed=0,
    disable_tqdm=True,
)


def train_args(output_dir: str | Path, **fields) -> MoEPruneArguments:
    return MoEPruneArguments(output_dir=str(output_dir), **{**QUIET_CPU_RUN, **fields})


def counting_dataset(rows: int = 16, length: int = 12, seed: int = 0) -> Dataset:
    """A learnable pattern (next token = token + 1) within every tiny vocabulary (ids < 99, the smallest)."""
    start = torch.randint(3, 60, (rows, 1), generator=torch.Generator().manual_seed(seed))
    ids = start + torch.arange(length)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
