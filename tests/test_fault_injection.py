"""SIGKILL each writing command at chosen points (``HF_MOEPRUNE_FAULT``): the output is absent, the old one or
the complete new one, and resuming gives what an uninterrupted run gives, bit for bit (issue 16)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_moeprune.commands import main
from hf_moeprune.inference import exclusive_output, writer_marker
from hf_moeprune.utils import FAULT_ENV, remove_stale_temporaries

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    """In-process and subprocess runs compared bit for bit must split their reductions the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_killed(argv, point, cwd):
    """Run ``hf-moeprune ARGV`` in a subprocess that SIGKILLs itself at fault point ``point``."""
    env = dict(os.environ, **{FAULT_ENV: point}, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "hf_moeprune.commands", "--log-level", "WARNING", *argv],
                            capture_output=True, text=True, cwd=cwd, env=env, timeout=600)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, (
        f"not killed at {point}: rc={result.returncode}\n{result.stderr[-3000:]}"
    )
    return result


CANARY = "hf_CanaryTokenIssue16xyzXYZ0123456789"


def _assert_no_canary(folder, *texts):
    """The Hub token given on the command line is in no file of the run (pickles included) and in no output."""
    for path in folder.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    for text in texts:
        assert CANARY not in text


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _train_argv(workspace, out):
    return ["train", "--model_name_or_path", str(workspace / "model"), "--data", str(workspace / "data.jsonl"),
            "--text_field", "body", "--block_size", "32", "--validation_fraction", "0", "--max_steps", "6",
            "--per_device_train_batch_size", "4", "--prune_target", "0.25", "--prune_schedule", "gradual",
            "--prune_start_step", "2", "--prune_end_step", "4", "--prune_grace_steps", "0",
            "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none", "--use_cpu", "true",
            "--disable_tqdm", "true", "--seed", "0", "--output_dir", str(out)]  # fmt: skip


def test_train_killed_in_a_checkpoint_and_in_the_final_save_resumes_to_the_same_model(
    workspace, tmp_path, capfd, caplog
):
    reference = tmp_path / "reference"
    assert main(["--log-level", "INFO", *_train_argv(workspace, reference), "--hub_token", CANARY]) == 0
    assert (reference / "checkpoint-2" / "training_args.bin").is_file()
    _assert_no_canary(reference, *capfd.readouterr(), caplog.text)
    out = tmp_path / "out"
    # 1. killed while writing checkpoint-4: pruning state written, Trainer's files not yet
    _run_killed(_train_argv(workspace, out), "train.checkpoint.state_written@2", tmp_path)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "checkpoint-4" / "moeprune_state.json").is_file()
    assert not (out / "checkpoint-4" / "trainer_state.json").exists()
    assert not (out / "config.json").exists()
    # a second run into the same folder is refused without --resume_from_checkpoint / --overwrite
    with pytest.raises(SystemExit, match="is not empty"):
        main(_train_argv(workspace, out))
    # 2. resumed (from checkpoint-2, skipping the partial checkpoint-4), killed while moving the final model in
    resume = [*_train_argv(workspace, out), "--resume_from_checkpoint", "last"]
    killed = _run_killed(resume, "replace_model_files.before_marker", tmp_path)
    assert "skipping incomplete checkpoint" in killed.stderr and "checkpoint-4" in killed.stderr
    assert not (out / "config.json").exists(), "no config.json until the weights beside it are the new ones"
    # 3. resumed again (from checkpoint-6): the model is the uninterrupted run's, bit for bit
    assert main(["--log-level", "WARNING", *resume]) == 0
    _assert_same_weights(_weights(out), _weights(reference))
    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    assert not any(p.name.startswith(".") for p in out.iterdir())


def _distill_argv(workspace, out):
    return ["distill", "--student", str(workspace / "model"), "--teacher", str(workspace / "model"),
            "--data", str(workspace / "data.jsonl"), "--text_field", "body", "--block_size", "32",
            "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
            "--seed", "0", "--output_dir", str(out)]  # fmt: skip


def test_distill_resumes_bit_identically_and_leaves_no_hidden_folders(workspace, tmp_path, capfd, caplog):
    reference = tmp_path / "reference"
    assert main(["--log-level", "INFO", *_distill_argv(workspace, reference), "--hub_token", CANARY]) == 0
    assert (reference / "training_args.bin").is_file()
    _assert_no_canary(reference, *capfd.readouterr(), caplog.text)
    out = tmp_path / "out"
    _run_killed(_distill_argv(workspace, out), "distill.checkpoint_saved@1", tmp_path)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file(), "checkpoints are in output_dir, visible"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert main(["--log-level", "WARNING", *_distill_argv(workspace, out), "--resume_from_checkpoint", "last"]) == 0
    trained = _weights(out)
    _assert_same_weights(trained, _weights(reference))
    assert not all(torch.equal(trained[k], v) for k, v in _weights(workspace / "model").items()), "it trained"


PROMPTS = ["def dumps", "import re", "class JSONDecodeError", "the object", "return", "if not"]


def test_generate_overwrite_kill_keeps_old_results_and_resume_completes(workspace, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    common = ["generate", str(workspace / "model"), "--prompts", str(prompts), "--max_new_tokens", "3",
              "--batch_size", "2", "--sort_window", "2", "--progress", "false", "--device", "cpu"]  # fmt: skip
    reference, out = tmp_path / "reference.jsonl", tmp_path / "out.jsonl"
    assert main(["--log-level", "WARNING", *common, "--out", str(reference)]) == 0
    # --overwrite killed after 3 new records: the old results are all still there
    out.write_text('{"id": "old", "completion": "kept"}\n')
    old = out.read_bytes()
    _run_killed([*common, "--out", str(out), "--overwrite"], "generate.record@3", tmp_path)
    assert out.read_bytes() == old
    # a fresh run killed after 2 records, then resumed: the uninterrupted result
    out.unlink()
    _run_killed([*common, "--out", str(out)], "generate.record@2", tmp_path)
    assert len(out.read_text().splitlines()) == 2 and writer_marker(out).exists()
    assert main(["--log-level", "WARNING", *common, "--out", str(out), "--resume"]) == 0
    assert out.read_bytes() == reference.read_bytes()
    assert not list(tmp_path.glob(".out.jsonl.tmp-*")), "the killed overwrite's temporary file was cleaned"
    # --overwrite that completes replaces the file
    assert main(["--log-level", "WARNING", *common, "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() == reference.read_bytes()
    # a second writer of the same --out is refused while the first holds it; nothing is written
    with exclusive_output(out), pytest.raises(SystemExit, match="is being written by another process") as exited:
        main([*common, "--out", str(out), "--overwrite"])
    assert exited.value.code == 2 and out.read_bytes() == reference.read_bytes()
    # --resume never repairs a file it did not write: one foreign line without a trailing newline stays as it is
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"note": "my own file"')
    with pytest.raises(SystemExit, match="not written by hf-moeprune generate") as exited:
        main([*common, "--out", str(foreign), "--resume"])
    assert exited.value.code == 2 and foreign.read_text() == '{"note": "my own file"'


def test_prune_overwrite_killed_mid_swap_restores_the_old_output(workspace, tmp_path):
    out = tmp_path / "pruned"
    base = ["prune", str(workspace / "model"), "--output_dir", str(out)]
    assert main(["--log-level", "WARNING", *base, "--keep", '{"0": [0, 1, 2]}']) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    _run_killed([*base, "--keep", '{"0": [4, 5]}', "--overwrite"], "atomic_output_dir.old_moved", tmp_path)
    assert not out.exists(), "between the two renames: absent (the old folder is aside, complete)"
    remove_stale_temporaries(out)  # what the next command writing there does first
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert main(["--log-level", "WARNING", *base, "--keep", '{"0": [4, 5]}', "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["experts_per_layer"][0] == 2


def test_stale_temporaries_of_dead_runs_are_removed_live_ones_kept(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "model"
    stale = tmp_path / f".model.tmp-{dead.pid}-abc"
    live = tmp_path / f".model.tmp-{os.getpid()}-def"
    legacy = tmp_path / ".model.tmp-k2j4h5"
    for folder in (stale, live, legacy):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".model.jsonl.tmp-{dead.pid}-x").write_text("{}")  # generate's kind, another output: untouched
    assert remove_stale_temporaries(out) == [stale]
    assert live.is_dir() and legacy.is_dir() and not stale.exists()
    assert "earlier version" in caplog.text
