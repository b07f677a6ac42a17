"""The training arguments every trainer test and multi-process script starts from: a quiet, deterministic CPU run
(no reports, no checkpoints, no progress bars, fixed seeds). Each caller names only the fields its check is about."""

from pathlib import Path

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
