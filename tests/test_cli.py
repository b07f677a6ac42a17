import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from hf_moeprune import prune_experts
from hf_moeprune.commands import COMMANDS, main


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "hf_moeprune.commands", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
    assert {"train", "prune", "push"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_help_works(name, capsys):
    """`hf-moeprune NAME --help` lists the options of the subcommand's dataclasses and exits 0 (train's once
    failed: a '%' in a help text)."""
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0
    assert f"usage: hf-moeprune {name}" in capsys.readouterr().out


def test_train_from_yaml_recipe_with_flag_override(workspace, capsys):
    recipe = workspace / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {workspace / 'model'}\ndata: {workspace / 'data.jsonl'}\ntext_field: body\n"
        f"output_dir: {workspace / 'out'}\nblock_size: 32\nmax_steps: 4\nper_device_train_batch_size: 4\n"
        "prune_target: 0.25\nprune_start_step: 2\nreport_to: []\nuse_cpu: true\nsave_strategy: 'no'\n"
        "disable_tqdm: true\n"
    )
    assert main(["--log-level", "WARNING", "train", str(recipe), "--prune_layer_adaptive", "false"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index('{\n  "output_dir"') :])
    assert summary["routed_experts"] == 18 and summary["original_routed_experts"] == 24
    assert summary["eval_loss"] > 0
    out = workspace / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "mixtral"  # uniform -> stock export
    assert model.config.num_local_experts == 6
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["allocation"]["mode"] == "uniform"
    assert (out / "tokenizer.json").exists()


def test_recipe_with_unknown_field_fails_naming_it(workspace, capsys):
    recipe = workspace / "bad.yaml"
    recipe.write_text(f"model_name_or_path: {workspace / 'model'}\ndata: x\noutput_dir: y\nprune_targett: 0.5\n")
    with pytest.raises(SystemExit):
        main(["train", str(recipe)])
    assert "prune_targett" in capsys.readouterr().err


def test_prune_subcommand_writes_atomically(workspace):
    out = workspace / "pruned"
    assert (
        main(
            [
                "prune",
                "--model",
                str(workspace / "model"),
                "--output_dir",
                str(out),
                "--keep",
                '{"0": [0, 1, 2], "2": [4, 5]}',
            ]
        )
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.experts_per_layer == [3, 8, 2]
    # the tokenizer and generation config come along, so `generate` and `push` work on the output
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    with pytest.raises(SystemExit, match=r"layer 0: expert indices \[9\] out of range") as failed:
        main(
            [
                "prune",
                "--model",
                str(workspace / "model"),
                "--output_dir",
                str(workspace / "p2"),
                "--keep",
                '{"0": [0, 9]}',
            ]
        )
    assert failed.value.code == 2
    assert not (workspace / "p2").exists(), "a failed prune must not leave an output folder"
    with pytest.raises(SystemExit, match="is not empty"):
        main(["prune", "--model", str(workspace / "model"), "--output_dir", str(out), "--keep", '{"0": [0, 1]}'])
    assert AutoModelForCausalLM.from_pretrained(out).config.experts_per_layer == [3, 8, 2], "existing output kept"


def test_prune_subcommand_drops_group_limited_routing_only_when_asked(tmp_path):
    """A plan that breaks DeepSeek-V3's expert groups exits 2 naming --drop_group_limited_routing and writes nothing;
    with the flag the streamed output routes without groups (n_group 1) and equals the in-process result."""
    import torch

    from hf_moeprune.demo.tiny_models import tiny_model

    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    model.save_pretrained(tmp_path / "model")
    plan = {1: [0, 1, 2], 2: [5, 6, 7]}  # group sizes 3 + 0 and 0 + 3: no whole number per group
    argv = ["prune", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"), "--keep", json.dumps(plan)]
    with pytest.raises(SystemExit, match="--drop_group_limited_routing") as failed:
        main(argv)
    assert failed.value.code == 2 and not (tmp_path / "out").exists()
    assert main([*argv, "--drop_group_limited_routing", "true"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["n_group"], config["topk_group"], config["n_routed_experts"]) == (
        "deepseek_v3",
        1,
        1,
        3,
    )
    prune_experts(model, plan, drop_group_limited_routing=True)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
    torch.testing.assert_close(saved, expected, rtol=0, atol=1e-6)


def test_prune_subcommand_one_shot_from_calibration_data(workspace, capsys):
    """`prune --data`: REAP one-shot on calibration text, the same plan the Python API makes."""
    import json

    from transformers import AutoTokenizer

    from hf_moeprune.data import calibration_blocks
    from hf_moeprune.oneshot import collect_statistics, plan_oneshot

    out = workspace / "oneshot"
    argv = ["prune", str(workspace / "model"), "--output_dir", str(out), "--data", str(workspace / "data.jsonl"),
            "--text_field", "body", "--block_size", "32", "--target", "0.5", "--allocation", "global"]  # fmt: skip
    assert main(["prune", "--model", *argv[1:]]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = AutoModelForCausalLM.from_pretrained(out)
    counts = [layer.mlp.experts.num_experts for layer in saved.model.layers]
    assert summary["experts_per_layer"] == counts and sum(counts) == 12
    config = json.loads((out / "config.json").read_text())
    fields = config.get("moeprune_provenance", config)  # stock export when the counts came out uniform
    assert (out / "tokenizer.json").exists()
    # the same statistics and plan in Python
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    ids = calibration_blocks(
        str(workspace / "data.jsonl"), AutoTokenizer.from_pretrained(workspace / "model"), "body", 32
    )
    stats = collect_statistics(model, [{"input_ids": ids[i : i + 8]} for i in range(0, len(ids), 8)], progress=False)
    plan = plan_oneshot(model, stats, "reap", 0.5, "global")
    prune_experts(model, plan)
    assert fields["kept_expert_ids"] == model.config.kept_expert_ids


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give exactly one of --keep .* or --data"),
        (["--keep", '{"0": [0, 1]}', "--data", "x.jsonl"], "give exactly one of --keep"),
        (["--data", "x.jsonl", "--criterion", "magic"], "unknown .*'magic'"),
        (["--data", "x.jsonl", "--allocation", "even"], "allocation mode 'even'"),
        (["--data", "x.jsonl", "--target", "1.0"], r"target=1.0 must be in \[0, 1\)"),
    ],
)
def test_prune_subcommand_bad_arguments_name_the_value(workspace, extra, message):
    out = workspace / "never"
    with pytest.raises((ValueError, SystemExit), match=message):
        main(["prune", str(workspace / "model"), "--output_dir", str(out), *extra])
    assert not out.exists()


def test_train_lora_recipe_from_examples(workspace, capsys):
    """The shipped LoRA recipe, with the model, data and a short run given as flags."""
    from pathlib import Path

    import torch
    from peft import PeftModel

    recipe = Path(__file__).parents[1] / "examples" / "lora_prune_recipe.yaml"
    out = workspace / "lora-out"
    flags = ["--model_name_or_path", str(workspace / "model"), "--data", str(workspace / "data.jsonl"),
             "--text_field", "body", "--output_dir", str(out), "--block_size", "32", "--max_steps", "4",
             "--prune_schedule", "oneshot", "--prune_start_step", "2", "--lora_r", "4", "--use_cpu", "true",
             "--save_strategy", "no", "--disable_tqdm", "true", "--warmup_steps", "0"]  # fmt: skip
    assert main(["--log-level", "WARNING", "train", str(recipe), *flags]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index('{\n  "output_dir"') :])
    assert summary["routed_experts"] == 12 and summary["trainable_parameters"] < 30_000
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    assert sum(base.config.experts_per_layer if base.config.model_type.startswith("moeprune") else
               [base.config.num_local_experts] * 3) == 12  # fmt: skip
    ids = torch.randint(4, 128, (2, 10))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert (out / "merged" / "tokenizer.json").exists()
