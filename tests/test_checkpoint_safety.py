"""Trainer checkpoints: no pickle is run from a checkpoint folder, partial checkpoints are recognised (issue 16)."""

import logging
import os
import shutil

import pytest
import torch
from test_trainer import _args, _dataset, _state

from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer
from hf_moeprune.training.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    CheckpointError,
    checkpoint_problem,
    last_complete_checkpoint,
    load_pruning_state,
    save_pruning_state,
)

COMMON = dict(max_steps=8, save_strategy="steps", save_steps=5, prune_schedule="gradual",
              prune_start_step=2, prune_end_step=6, prune_grace_steps=0)  # fmt: skip


class _Payload:
    """Unpickling this runs ``touch marker``: what a crafted file in a downloaded checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path, marker):
    torch.save({"state": _Payload(marker), "budgets": {}}, path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted run that saved checkpoint-5 and checkpoint-8, and its final weights."""
    root = tmp_path_factory.mktemp("run")
    trainer = MoEPruneTrainer(model=tiny_model("mixtral"), args=_args(root, **COMMON), train_dataset=_dataset())
    trainer.train()
    return root / "run", _state(trainer.model), trainer.model.config.kept_expert_ids


def _copy_run(finished_run, tmp_path):
    run, expected, kept = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, expected, kept


def _fresh(output_dir):
    args = MoEPruneArguments(**{**_args(output_dir.parent).to_dict(), **COMMON, "output_dir": str(output_dir)})
    return MoEPruneTrainer(model=tiny_model("mixtral"), args=args, train_dataset=_dataset())


def test_state_round_trips_without_pickle(tmp_path):
    state = {
        "budgets": {0: {"original": 8, "current": 6}},
        "masked": {1: torch.tensor([True, False])},
        "stability": [(3, 0.5), (4, float("nan"))],
        "acc": {2: {"tokens": torch.arange(4.0), "reap": torch.ones(4, dtype=torch.float64)}},
        "grace": None,
        "__odd": "key",
    }
    save_pruning_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_JSON, STATE_TENSORS]
    back = load_pruning_state(tmp_path)
    assert back["budgets"] == {0: {"original": 8, "current": 6}}
    assert torch.equal(back["masked"][1], state["masked"][1])
    assert back["stability"][0] == (3, 0.5) and back["stability"][1][1] != back["stability"][1][1]  # nan
    assert (
        torch.equal(back["acc"][2]["reap"], state["acc"][2]["reap"]) and back["acc"][2]["reap"].dtype == torch.float64
    )
    assert back["__odd"] == "key"


def test_partial_or_foreign_state_is_named_not_loaded(tmp_path):
    save_pruning_state(tmp_path, {"budgets": {}, "x": torch.ones(64)})
    tensors = (tmp_path / STATE_TENSORS).read_bytes()
    (tmp_path / STATE_TENSORS).write_bytes(tensors[: len(tensors) // 2])  # cut short by a kill
    with pytest.raises(CheckpointError, match="does not match moeprune_state.json"):
        load_pruning_state(tmp_path)
    (tmp_path / STATE_JSON).write_text('{"format": 1, "tens')  # JSON cut short
    with pytest.raises(CheckpointError, match="is not a readable pruning state"):
        load_pruning_state(tmp_path)
    (tmp_path / STATE_JSON).unlink()
    with pytest.raises(CheckpointError, match="has no pruning state"):
        load_pruning_state(tmp_path)


def test_no_pickle_from_a_checkpoint_is_ever_run(finished_run, tmp_path):
    """A crafted pickle in each file that resuming reads: never executed; the resume fails with a clear error."""
    marker = tmp_path / "PWNED"
    run, _, _ = _copy_run(finished_run, tmp_path)
    checkpoint = run / "checkpoint-5"
    # the pruning state of an earlier version was a pickle: it is read with weights_only=True
    legacy = tmp_path / "legacy"
    shutil.copytree(checkpoint, legacy)
    (legacy / STATE_JSON).unlink()
    write_payload(legacy / "moeprune_state.pt", marker)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        _fresh(run).train(resume_from_checkpoint=str(legacy))
    assert not marker.exists()
    # the files transformers reads on resume (and training_args.bin, which nothing may read)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        poisoned = tmp_path / f"poisoned-{name}"
        shutil.copytree(checkpoint, poisoned)
        write_payload(poisoned / name, marker)
        try:
            _fresh(run).train(resume_from_checkpoint=str(poisoned))
        except Exception as exc:  # noqa: BLE001 - which error transformers raises is its business; no run is ours
            assert "weights_only" in str(exc) or "Unpickl" in type(exc).__name__ + str(exc), exc
        assert not marker.exists(), name


def test_legacy_pickled_state_of_plain_values_still_resumes(finished_run, tmp_path):
    run, expected, kept = _copy_run(finished_run, tmp_path)
    checkpoint = run / "checkpoint-5"
    torch.save(load_pruning_state(checkpoint), checkpoint / "moeprune_state.pt")  # what earlier versions wrote
    (checkpoint / STATE_JSON).unlink()
    (checkpoint / STATE_TENSORS).unlink()
    fresh = _fresh(run)
    fresh.train(resume_from_checkpoint=str(checkpoint))
    assert fresh.model.config.kept_expert_ids == kept
    assert all(torch.equal(_state(fresh.model)[k], v) for k, v in expected.items())


def test_partial_last_checkpoint_is_skipped_and_resume_matches_uninterrupted_run(finished_run, tmp_path, caplog):
    run, expected, kept = _copy_run(finished_run, tmp_path)
    last = run / "checkpoint-8"
    # killed after the pruning state, before Trainer's trainer_state.json (the file it writes last)
    (last / "trainer_state.json").unlink()
    assert "has no trainer_state.json" in checkpoint_problem(last)
    with pytest.raises(CheckpointError, match="cannot resume: .*checkpoint-8.* has no trainer_state.json"):
        _fresh(run).train(resume_from_checkpoint=str(last))
    with caplog.at_level(logging.WARNING, logger="hf_moeprune"):
        assert last_complete_checkpoint(run) == run / "checkpoint-5"
    assert "skipping incomplete checkpoint" in caplog.text
    fresh = _fresh(run)
    fresh.train(resume_from_checkpoint=True)  # falls back to checkpoint-5
    assert fresh.model.config.kept_expert_ids == kept
    resumed = _state(fresh.model)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_state_from_another_step_is_refused(finished_run, tmp_path):
    run, _, _ = _copy_run(finished_run, tmp_path)
    checkpoint = run / "checkpoint-5"
    state = load_pruning_state(checkpoint)
    state["budgets"][0]["current"] = 8  # the state of a step before layer 0 was pruned, beside a later config
    save_pruning_state(checkpoint, state)
    with pytest.raises(CheckpointError, match="8 experts in layer 0 but its config.json keeps 4"):
        _fresh(run).train(resume_from_checkpoint=str(checkpoint))


def test_no_pickle_from_a_model_folder_is_run_by_the_commands(workspace, tmp_path, capsys):
    """A model folder whose weights are a crafted pytorch_model.bin (and a crafted training_args.bin beside them):
    prune/quantize/generate refuse it with one line (transformers loads .bin with weights_only=True); nothing runs."""
    from hf_moeprune.commands import main

    marker = tmp_path / "PWNED"
    folder = tmp_path / "model"
    shutil.copytree(workspace / "model", folder)
    (folder / "model.safetensors").unlink()
    write_payload(folder / "pytorch_model.bin", marker)
    write_payload(folder / "training_args.bin", marker)
    (tmp_path / "prompts.jsonl").write_text('{"id": 1, "prompt": "def"}\n')
    for argv in (
        ["prune", str(folder), "--output_dir", str(tmp_path / "pruned"), "--keep", '{"0": [0, 1, 2]}'],
        ["quantize", str(folder), str(tmp_path / "quantized")],
        ["generate", str(folder), "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "o.jsonl")],
    ):
        with pytest.raises(SystemExit) as exited:
            main(["--log-level", "ERROR", *argv])
        assert exited.value.code == 2, argv
        assert "weights_only" in capsys.readouterr().err.strip().splitlines()[-1].lower().replace(" ", "_"), argv
        assert not marker.exists(), argv
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "quantized").exists()


def test_atomic_output_file_replaces_only_a_complete_file(tmp_path):
    from hf_moeprune.utils import atomic_output_file, atomic_write_text, remove_stale_temporaries

    out = tmp_path / "report.json"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_output_file(out) as tmp:
        # named so that remove_stale_temporaries can tell whose it is
        assert tmp.parent == tmp_path and tmp.name.startswith(f".report.json.tmp-{os.getpid()}-")
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    atomic_write_text(out, "new ✓")
    assert out.read_text(encoding="utf-8") == "new ✓" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    assert remove_stale_temporaries(out) == []
