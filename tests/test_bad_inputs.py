"""Every subcommand on bad input: exit code 2, one line naming the value (and file:line), nothing written (issue 16).

Rows run in this process through ``hf_moeprune.commands.main`` (a subprocess per row would cost ~4 s each); one row
runs the real console entry in a subprocess to pin down what a user sees there.
"""

import json
import shutil
import subprocess
import sys

import pytest

from hf_moeprune.commands import main

W = "{ws}"  # the session workspace (tiny Mixtral + tokenizer, data.jsonl with field "body")
T = "{tmp}"  # this row's empty folder: everything a row could write lands here


@pytest.fixture(scope="module")
def inputs(workspace):
    root = workspace / "bad-inputs"
    if not root.exists():
        root.mkdir()
        (root / "empty.jsonl").write_text("")
        (root / "bad.jsonl").write_bytes(b'{"body": "fine text"}\n{"body": "caf\xe9 latin-1"}\n')
        (root / "notjson.jsonl").write_text('{"body": "ok"}\n{"body": oops}\n')
        (root / "prompts.jsonl").write_text('{"id": 1, "prompt": "def"}\n')
        (root / "no_prompts.jsonl").write_text('{"id": 1}\nnot json\n')
        topk = root / "topk"
        shutil.copytree(workspace / "model", topk)
        config = json.loads((topk / "config.json").read_text())
        config["num_experts_per_tok"] = 12
        (topk / "config.json").write_text(json.dumps(config))
        (root / "recipe_offline.yaml").write_text(
            f"model: {workspace / 'model'}\noutput_dir: OUT\npush_repo_id: tester/x\ntoken: hf_Canary\n"
        )
        (root / "full").mkdir()
        (root / "full" / "keep.txt").write_text("earlier results\n")
    return root


TRAIN = ["train", "--model_name_or_path", f"{W}/model", "--output_dir", f"{T}/out", "--use_cpu", "true",
         "--report_to", "none", "--text_field", "body"]  # fmt: skip
PRUNE = ["prune", f"{W}/model", "--output_dir", f"{T}/out"]
DISTILL = ["distill", "--student", f"{W}/model", "--teacher", f"{W}/model", "--output_dir", f"{T}/out",
           "--use_cpu", "true", "--report_to", "none", "--text_field", "body"]  # fmt: skip
GENERATE = ["generate", f"{W}/model", "--prompts", f"{W}/bad-inputs/prompts.jsonl", "--out", f"{T}/out.jsonl"]

ROWS = {
    # name: (argv, message regex)
    "train-empty-jsonl": (TRAIN + ["--data", f"{W}/bad-inputs/empty.jsonl"], r"empty.jsonl' is empty \(no records\)"),
    "train-invalid-utf8": (TRAIN + ["--data", f"{W}/bad-inputs/bad.jsonl"], r"bad.jsonl:2: not UTF-8 text"),
    "train-not-json": (TRAIN + ["--data", f"{W}/bad-inputs/notjson.jsonl"], r"notjson.jsonl:2: not a JSON object"),
    "train-missing-data": (TRAIN + ["--data", f"{T}/nowhere.jsonl"], r"--data '.*nowhere.jsonl' does not exist"),
    "train-non-empty-output": (
        [
            "train",
            "--model_name_or_path",
            f"{W}/model",
            "--data",
            f"{W}/data.jsonl",
            "--output_dir",
            f"{W}/bad-inputs/full",
        ],  # fmt: skip
        r"output_dir '.*full' is not empty; pass --resume_from_checkpoint last to continue its run, --overwrite",
    ),
    "train-resume-nowhere": (
        TRAIN + ["--data", f"{W}/data.jsonl", "--resume_from_checkpoint", f"{T}/checkpoint-9"],
        r"checkpoint '.*checkpoint-9' does not exist",
    ),
    "train-resume-last-without-checkpoint": (
        TRAIN + ["--data", f"{W}/data.jsonl", "--resume_from_checkpoint", "last"],
        r"no complete checkpoint-N folder in",
    ),
    "train-resume-and-overwrite": (
        TRAIN + ["--data", f"{W}/data.jsonl", "--resume_from_checkpoint", "last", "--overwrite"],
        "exclude each other",
    ),
    "train-block-size": (TRAIN + ["--data", f"{W}/data.jsonl", "--block_size", "1"], r"block_size=1 must be >= 2"),
    "train-prune-target": (TRAIN + ["--data", f"{W}/data.jsonl", "--prune_target", "1.5"], r"prune_target.*1.5"),
    "prune-fractional-expert": (PRUNE + ["--keep", '{"0": [0.5, 1]}'], r"layer 0 needs .*\(\[0.5\] not integers\)"),
    "prune-keep-not-json": (PRUNE + ["--keep", "{0: [1]}"], r"--keep '\{0: \[1\]\}' is not JSON"),
    "prune-keep-layer-key": (PRUNE + ["--keep", '{"first": [1, 2]}'], r"layer key 'first' is not a layer index"),
    "prune-keep-repeated": (PRUNE + ["--keep", '{"0": [1, 1, 2]}'], r"layer 0 lists an expert twice"),
    "prune-empty-jsonl": (PRUNE + ["--data", f"{W}/bad-inputs/empty.jsonl"], r"empty.jsonl' is empty"),
    "prune-invalid-utf8": (PRUNE + ["--data", f"{W}/bad-inputs/bad.jsonl", "--text_field", "body"], r"bad.jsonl:2:"),
    "prune-top-k-too-large": (
        ["prune", f"{W}/bad-inputs/topk", "--output_dir", f"{T}/out", "--keep", '{"0": [0, 1, 2]}'],
        r"top-k\)=12 is larger than the 8 experts of layer 0",
    ),
    "prune-non-empty-output": (
        ["prune", f"{W}/model", "--output_dir", f"{W}/bad-inputs/full", "--keep", '{"0": [0, 1]}'],
        r"is not empty; choose another or pass --overwrite",
    ),
    "prune-unknown-flag": (PRUNE + ["--keep", '{"0": [0, 1]}', "--targett", "0.5"], r"not used .*\['--targett'"),
    "balance-ep-size": (
        ["balance", f"{W}/model", "--output_dir", f"{T}/out", "--data", f"{W}/data.jsonl", "--ep_size", "0"],
        r"ep_size=0 must be >= 1",
    ),
    "balance-missing-data": (
        ["balance", f"{W}/model", "--output_dir", f"{T}/out", "--data", f"{T}/none.jsonl"],
        r"none.jsonl' does not",
    ),
    "quantize-scheme": (["quantize", f"{W}/model", f"{T}/out", "--scheme", "int3"], r"unknown quantization scheme"),
    "quantize-missing-model": (["quantize", f"{T}/no-model", f"{T}/out"], r"no-model"),
    "distill-missing-data": (DISTILL + ["--data", f"{T}/nowhere.jsonl"], r"data='.*nowhere.jsonl' is not a file"),
    "distill-block-size": (DISTILL + ["--data", f"{W}/data.jsonl", "--block_size", "1"], r"block_size=1 must be"),
    "distill-empty-jsonl": (DISTILL + ["--data", f"{W}/bad-inputs/empty.jsonl"], r"empty.jsonl' is empty"),
    "generate-no-valid-prompt": (
        ["generate", f"{W}/model", "--prompts", f"{W}/bad-inputs/no_prompts.jsonl", "--out", f"{T}/out.jsonl"],
        r"holds no valid prompt",
    ),
    "generate-dtype": (GENERATE + ["--dtype", "float8"], r"--dtype 'float8' is not known"),
    "generate-resume-and-overwrite": (GENERATE + ["--resume", "--overwrite"], "exclude each other"),
    "generate-max-new-tokens": (GENERATE + ["--max_new_tokens", "0"], r"max_new_tokens"),
    "compress-missing-recipe": (["compress", f"{T}/nope.yaml"], r"recipe '.*nope.yaml' does not exist"),
    "compress-push-offline": (
        ["compress", f"{W}/bad-inputs/recipe_offline.yaml", "--output_dir", f"{T}/out"],
        r"push_repo_id='tester/x' needs the Hub, but offline mode is on",
    ),  # fmt: skip
    "push-missing-folder": (["push", f"{T}/nowhere", "tester/x", "--token", "hf_x"], r"nowhere' does not exist"),
    "push-bad-repo-id": (["push", f"{W}/model", "a/b/c", "--token", "hf_x"], r"repo_id='a/b/c'"),
    "demo-non-empty-output": (["demo", "--output_dir", f"{W}/bad-inputs/full"], r"is not empty"),
}


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_bad_input_is_one_line_exit_2_nothing_written(row, workspace, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv, message = ROWS[row]
    argv = [a.replace(W, str(workspace)).replace(T, str(tmp_path)) for a in argv]
    before, before_inputs = _files(tmp_path), _files(inputs)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["--log-level", "ERROR", *argv])
    assert exited.value.code == 2, row
    err = capsys.readouterr().err.strip().splitlines()
    assert err, f"{row}: no message"
    last = err[-1]
    assert last.startswith(f"hf-moeprune {argv[0]}: error:"), (row, err)
    assert "Traceback" not in "\n".join(err)
    import re

    assert re.search(message, last), (row, last)
    assert _files(tmp_path) == before, f"{row} wrote {set(_files(tmp_path)) - set(before)}"
    assert _files(inputs) == before_inputs, f"{row} changed an input"


def test_console_script_prints_one_line_and_exits_2(workspace, inputs, tmp_path):
    """The real entry point: what the user sees (no traceback; --debug shows it)."""
    argv = [sys.executable, "-m", "hf_moeprune.commands", "prune", str(workspace / "model"), "--output_dir",
            str(tmp_path / "out"), "--keep", '{"0": [0.5, 1]}']  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("hf-moeprune prune: error: --keep: layer 0 needs")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
