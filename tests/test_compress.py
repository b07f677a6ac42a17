import json

import pytest
import torch
from hub_server import FakeHub, point_hub_client_at
from transformers import AutoModelForCausalLM

from hf_moeprune.commands import main
from hf_moeprune.hub import MissingTokenError


def _student(workspace, tmp_path):
    from transformers import AutoTokenizer

    from hf_moeprune import prune_experts

    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    prune_experts(model, {0: [0, 1, 2, 3], 1: [1, 3, 5, 7, 0, 2], 2: [4, 5]})
    model.save_pretrained(tmp_path / "student")
    AutoTokenizer.from_pretrained(workspace / "model").save_pretrained(tmp_path / "student")
    return str(tmp_path / "student")


def _recipe(workspace, tmp_path, **extra):
    fields = {
        "model": _student(workspace, tmp_path),
        "output_dir": str(tmp_path / "out"),
        "teacher": str(workspace / "model"),
        "data": str(workspace / "data.jsonl"),
        "text_field": "body",
        "block_size": 16,
        "distill_steps": 2,
        "batch_size": 4,
        "quant_scheme": "int8",
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()))
    return path


def test_compress_chain_distills_quantizes_writes_card_and_pushes(workspace, tmp_path, monkeypatch, capsys):
    with FakeHub(token="secret-token") as hub:
        point_hub_client_at(monkeypatch, hub, tmp_path)
        recipe = _recipe(workspace, tmp_path, push_repo_id="tester/tiny-compressed", private=True,
                         token="secret-token", endpoint=hub.url)  # fmt: skip
        assert main(["--log-level", "WARNING", "compress", str(recipe)]) == 0
        arrived = hub.files("tester/tiny-compressed")
    summary = json.loads((tmp_path / "out" / "compress_summary.json").read_text())
    assert summary["steps"] == ["distill", "quantize:int8", "card"]
    assert summary["bytes_out"] < 0.5 * summary["bytes_in"]
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(arrived)
    assert arrived["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert "int8" in card and "CE" in card and "| 1 |" in card  # per-layer counts table
    assert json.loads((out / "config.json").read_text())["experts_per_layer"] == [4, 6, 2]
    assert "secret-token" not in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hf_moeprune"
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    teacher = AutoModelForCausalLM.from_pretrained(workspace / "model")
    with torch.no_grad():
        assert not torch.equal(reloaded(ids).logits, teacher(ids).logits)  # distilled and quantized: changed


@pytest.mark.parametrize(
    "extra, error, message",
    [
        ({"quant_scheme": "int3"}, ValueError, "int3"),
        ({"data": None}, ValueError, "no data to distill"),
        ({"push_repo_id": "tester/x"}, MissingTokenError, "no Hugging Face token"),
        ({"quant_format": "gguf"}, ValueError, "quant_format='gguf'; accepted"),
        ({"quant_format": "compressed-tensors", "quant_scheme": "nf4"}, ValueError, "no compressed-tensors form"),
        # the student keeps 4, 6 and 2 experts: no stock architecture holds that, refused before any work
        ({"quant_format": "compressed-tensors"}, ValueError, "different expert counts"),
    ],
)
def test_compress_bad_input_fails_before_writing(workspace, tmp_path, monkeypatch, extra, error, message):
    with FakeHub() as hub:
        point_hub_client_at(monkeypatch, hub, tmp_path)
        recipe = _recipe(workspace, tmp_path, **extra)
        with pytest.raises(SystemExit, match=message) as failed:  # one line on stderr, exit code 2
            main(["compress", str(recipe)])
        assert failed.value.code == 2 and issubclass(error, ValueError)
        assert not hub.requests
    assert not (tmp_path / "out").exists()


def test_compress_writes_compressed_tensors_for_a_uniform_layout(workspace, tmp_path):
    """A uniformly pruned student: ``auto`` writes the serving format (compressed-tensors), byte for byte what
    ``hf-moeprune quantize`` writes for the same model, and the card says so."""
    from transformers import AutoTokenizer

    from hf_moeprune import prune_experts

    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    prune_experts(model, {0: [0, 1, 2, 3], 1: [1, 3, 5, 7], 2: [4, 5, 6, 7]})
    student = tmp_path / "uniform"
    model.save_pretrained(student)
    AutoTokenizer.from_pretrained(workspace / "model").save_pretrained(student)
    recipe = _recipe(workspace, tmp_path, teacher=None, data=None, quant_scheme="int4")
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "student"), str(student)))
    assert main(["--log-level", "WARNING", "compress", str(recipe)]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "compress_summary.json").read_text())
    assert summary["format"] == "compressed-tensors W4A16" and summary["steps"] == ["quantize:int4", "card"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "compressed-tensors" in (out / "README.md").read_text()
    assert main(["quantize", str(student), str(tmp_path / "q"), "--scheme", "int4"]) == 0
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in (tmp_path / "q").glob("*.safetensors"))
    for name in weights:
        assert (out / name).read_bytes() == (tmp_path / "q" / name).read_bytes(), name
