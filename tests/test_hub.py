import json
import logging
import re
import textwrap

import pytest
import torch
from conftest import run_without_package
from hub_server import FakeHub, point_hub_client_at
from huggingface_hub import ModelCard

from hf_moeprune import get_adapter, prune_experts
from hf_moeprune.commands.push import _positionals_to_flags
from hf_moeprune.commands.push import main as push_main
from hf_moeprune.demo.tiny_models import tiny_config, tiny_model
from hf_moeprune.format.layout import expert_layout
from hf_moeprune.hub import (
    PLOT_FILENAME,
    CardInfo,
    DistillationInfo,
    EvalFigure,
    MissingTokenError,
    QuantizationInfo,
    build_model_card,
    push_to_hub,
    write_model_card,
)
from hf_moeprune.hub.plots import _matplotlib_available

TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"
REPO = "tester/tiny-pruned"
IDS = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
HAS_PLOT = _matplotlib_available()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def pruned_dir(tmp_path):
    """Mixtral with 3, 5 and 2 experts kept: saved in the pruned format with modeling_moeprune.py."""
    model = tiny_model("mixtral")
    prune_experts(model, {0: [0, 1, 2], 1: [0, 1, 2, 3, 4], 2: [7, 6]})
    folder = tmp_path / "pruned"
    model.save_pretrained(folder)
    torch.save(_logits(model), tmp_path / "expected.pt")
    return folder


@pytest.fixture
def stock_dir(tmp_path):
    """DeepSeek-V3 (first layer dense) keeping 4 of 8 experts everywhere: saved as the stock architecture."""
    model = tiny_model("deepseek_v3")
    prune_experts(model, {1: [0, 1, 2, 3], 2: [4, 5, 6, 7]})
    folder = tmp_path / "stock"
    model.save_pretrained(folder)
    torch.save(_logits(model), tmp_path / "expected_stock.pt")
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub(token=TOKEN) as server:
        point_hub_client_at(monkeypatch, server, tmp_path)
        yield server


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _folder_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ---------------------------------------------------------------- model card


def test_card_of_pruned_model(pruned_dir, tmp_path):
    info = CardInfo(base_model="mistralai/Mixtral-8x7B-v0.1", method="LAEP", criterion="token load", license="mit")
    path = write_model_card(pruned_dir, info, repo_id=REPO)
    text = path.read_text()
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["base_model"] == "mistralai/Mixtral-8x7B-v0.1"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "mit"
    assert {"hf_moeprune", "moe", "mixtral"} <= set(meta["tags"])

    # per-layer table: layer | kept | removed | original ids
    rows = re.findall(r"^\| (\d+) \| (\d+|dense) \| (\d+|-) \| ([\d, -]+) \|$", text, flags=re.M)
    assert rows == [("0", "3", "5", "0, 1, 2"), ("1", "5", "3", "0, 1, 2, 3, 4"), ("2", "2", "6", "7, 6")]
    assert "| Expert sparsity | 58.3% |" in text  # 14 of 24 removed
    assert "| Experts kept | 10 of 24 |" in text
    assert "| Method | LAEP |" in text and "| Criterion | token load |" in text
    for absent in ("## Quantization", "## Distillation", "## Evaluation"):
        assert absent not in text

    with_pkg, without_pkg = _python_blocks(text)
    assert "import hf_moeprune" in with_pkg and f'from_pretrained("{REPO}")' in with_pkg
    assert "trust_remote_code" not in with_pkg
    assert "hf_moeprune" not in without_pkg and f'from_pretrained("{REPO}", trust_remote_code=True)' in without_pkg

    if HAS_PLOT:
        assert f"![Experts kept per decoder layer]({PLOT_FILENAME})" in text
        assert (pruned_dir / PLOT_FILENAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the snippet with the package runs as written (repo id -> local folder) and gives the same logits
    namespace = {}
    exec(with_pkg.replace(f'"{REPO}"', repr(str(pruned_dir))), namespace)
    assert namespace["model"].config.experts_per_layer == [3, 5, 2]
    assert torch.equal(_logits(namespace["model"]), torch.load(tmp_path / "expected.pt"))


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (~10 s here)
def test_card_remote_code_snippet_runs_without_package(pruned_dir, tmp_path):
    text = write_model_card(pruned_dir, CardInfo(plot=False), repo_id=REPO).read_text()
    (without_pkg,) = [b for b in _python_blocks(text) if "trust_remote_code=True" in b]
    code = without_pkg.replace(f'"{REPO}"', repr(str(pruned_dir))) + textwrap.dedent(
        f"""
        import torch
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            out = model(torch.tensor({IDS.tolist()})).logits
        assert torch.equal(out, torch.load({str(tmp_path / "expected.pt")!r}))
        print("SNIPPET_OK", model.config.experts_per_layer)
        """
    )
    result = run_without_package(code)
    assert "SNIPPET_OK [3, 5, 2]" in result.stdout, result.stderr[-3000:]


def test_card_of_stock_export(stock_dir, tmp_path):
    config = json.loads((stock_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "moeprune_provenance" in config
    text = build_model_card(stock_dir, CardInfo(base_model="deepseek-ai/DeepSeek-V3", method="REAP"), repo_id=REPO)
    text = text.content
    rows = re.findall(r"^\| (\d+) \| (\d+|dense) \| (\d+|-) \| ([\d, -]+) \|$", text, flags=re.M)
    assert rows == [("0", "dense", "-", "-"), ("1", "4", "4", "0, 1, 2, 3"), ("2", "4", "4", "4, 5, 6, 7")]
    assert "| Expert sparsity | 50.0% |" in text
    assert "| Experts per MoE layer | 4 (originally 8) |" in text
    assert "stock `deepseek_v3` architecture" in text
    blocks = _python_blocks(text)
    assert len(blocks) == 1
    assert "hf_moeprune" not in blocks[0] and "trust_remote_code" not in blocks[0]
    assert "base_model: deepseek-ai/DeepSeek-V3" in text
    namespace = {}
    exec(blocks[0].replace(f'"{REPO}"', repr(str(stock_dir))), namespace)
    assert type(namespace["model"]).__name__ == "DeepseekV3ForCausalLM"
    torch.testing.assert_close(
        _logits(namespace["model"]), torch.load(tmp_path / "expected_stock.pt"), rtol=0, atol=1e-6
    )


def test_card_from_in_memory_config_and_optional_sections():
    model = tiny_model("qwen3_moe")
    prune_experts(model, {0: [1, 3], 1: [0, 1, 2, 3, 4, 5], 2: [2, 4, 6]})
    info = CardInfo(
        quantization=QuantizationInfo("torchao int8 weight-only", 8, "experts", size_mb_before=2.1, size_mb_after=0.73),
        distillation=DistillationInfo("Qwen/Qwen3-30B-A3B", temperature=2.0, alpha=0.5, steps=200),
        evaluation=[
            EvalFigure("perplexity", 12.3456, dataset="wikitext-2", baseline=11.0),
            EvalFigure("accuracy", 0.5),
        ],
    )
    text = build_model_card(model.config, info).content
    assert "| Size before | 2.10 MB |" in text and "| Size after | 0.73 MB |" in text
    assert "| Size ratio | 0.348 |" in text
    assert "| Teacher | Qwen/Qwen3-30B-A3B |" in text and "| Steps | 200 |" in text
    assert "\n| Loss |" not in text and "\n| Data |" not in text  # not given, not invented
    assert "| perplexity | wikitext-2 | 12.35 | 11 | +12.2% |" in text
    assert "| accuracy | - | 0.5 | - | - |" in text
    assert "| Experts per MoE layer | 2 to 6 (originally 8) |" in text
    assert "base_model" not in text.split("---")[1]  # unknown base model: no metadata key
    assert "Stored parameters" not in text  # no folder, no count

    only_eval = build_model_card(model.config, CardInfo(evaluation=info.evaluation)).content
    assert "## Evaluation" in only_eval
    assert "## Quantization" not in only_eval and "## Distillation" not in only_eval


def test_card_of_unpruned_model_and_overwrite(pruned_dir):
    text = build_model_card(tiny_config("mixtral").to_dict()).content
    assert "its experts were not pruned" in text and "## Pruning" not in text and "expert-pruning" not in text
    (block,) = _python_blocks(text)
    assert "hf_moeprune" not in block and "trust_remote_code" not in block
    with pytest.raises(ValueError, match="quant_method='bitsandbytes'.*cannot say how to load"):
        build_model_card({**tiny_config("mixtral").to_dict(), "quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_model_card(pruned_dir / "missing")
    first = write_model_card(pruned_dir, CardInfo(method="first"))
    before = first.read_bytes()
    with pytest.raises(FileExistsError, match="README.md"):
        write_model_card(pruned_dir, CardInfo(method="second"))
    assert first.read_bytes() == before
    write_model_card(pruned_dir, CardInfo(method="second"), overwrite=True)
    assert "| Method | second |" in first.read_text()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CardInfo(license="Apache 2.0"), r"CardInfo.license='Apache 2.0'"),
        (lambda: CardInfo(base_model="a/b/c"), r"CardInfo.base_model='a/b/c'"),
        (lambda: CardInfo(tags="moe"), r"CardInfo.tags='moe'"),
        (lambda: CardInfo(method=""), r"CardInfo.method=''"),
        (lambda: EvalFigure("ppl", float("nan")), r"EvalFigure.value \(ppl\)=nan"),
        (lambda: QuantizationInfo("int8", 0), r"QuantizationInfo.bits=0"),
        (lambda: DistillationInfo("t", alpha=1.5), r"DistillationInfo.alpha=1.5"),
        (lambda: DistillationInfo("t", steps=0), r"DistillationInfo.steps=0"),
    ],
)
def test_card_info_validation_names_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_expert_layout_checks_consistency():
    config = tiny_config("mixtral").to_dict()
    config["moeprune_provenance"] = {
        "experts_per_layer": [2, 3],
        "kept_expert_ids": [[0, 1], [0, 1]],
        "original_num_experts": 8,
    }
    with pytest.raises(ValueError, match=r"layer 1: experts_per_layer=3 disagrees with kept_expert_ids=\[0, 1\]"):
        expert_layout(config)
    config["moeprune_provenance"]["kept_expert_ids"][1].append(5)
    layout = expert_layout(config)
    assert layout.family == "mixtral" and layout.stock_export and layout.sparsity == pytest.approx(11 / 16)


# ---------------------------------------------------------------- push


def test_push_pruned_model(hub, pruned_dir, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "propagate", True)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    assert not (pruned_dir / "README.md").exists()

    url = push_to_hub(pruned_dir, REPO, private=True, token=TOKEN, card_info=CardInfo(method="LAEP"))

    assert url == f"{hub.url}/{REPO}"
    expected_names = {"config.json", "generation_config.json", "model.safetensors", "modeling_moeprune.py", "README.md"}
    expected_names |= {PLOT_FILENAME} if HAS_PLOT else set()
    arrived = hub.files(REPO)
    local = _folder_files(pruned_dir)
    assert set(arrived) == expected_names == set(local)
    for name in expected_names:
        assert arrived[name] == local[name], name
    assert "| 1 | 5 | 3 | 0, 1, 2, 3, 4 |" in arrived["README.md"].decode()
    assert "| Method | LAEP |" in arrived["README.md"].decode()

    paths = [r.path for r in hub.requests]
    assert paths == [
        "/api/repos/create",
        "/api/validate-yaml",
        f"/api/models/{REPO}/preupload/main",
        f"/api/models/{REPO}/commit/main",
    ]
    create = hub.requests[0].json()
    assert create["visibility"] == "private" and create["name"] == "tiny-pruned" and create["organization"] == "tester"
    assert hub.repos[REPO].private is True
    assert [r.headers.get("authorization") for r in hub.requests] == [f"Bearer {TOKEN}"] * 4
    assert hub.repos[REPO].commits[0]["summary"] == "Upload pruned MoE model (hf_moeprune)"

    # the token was sent in headers only: not in a file, not in a request body, not in a log record
    for path in pruned_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert all(TOKEN.encode() not in r.body for r in hub.requests)
    assert any("pushed" in rec.getMessage() for rec in caplog.records)  # the capture did see our records
    assert any(rec.name.startswith("huggingface_hub") for rec in caplog.records)  # and the client's
    for rec in caplog.records:
        assert TOKEN not in rec.getMessage(), rec.name
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("source", ["env", "token_file"])
def test_push_takes_token_from_usual_places(hub, stock_dir, monkeypatch, tmp_path, source):
    from huggingface_hub import constants

    if source == "env":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))

    push_to_hub(stock_dir, "tester/stock-model")

    assert [r.headers.get("authorization") for r in hub.requests] == [f"Bearer {TOKEN}"] * 4
    assert hub.requests[0].json()["visibility"] == "public"
    arrived = hub.files("tester/stock-model")
    expected = {"config.json", "generation_config.json", "model.safetensors", "README.md"}
    assert set(arrived) == expected | ({PLOT_FILENAME} if HAS_PLOT else set())
    assert arrived["model.safetensors"] == (stock_dir / "model.safetensors").read_bytes()
    (snippet,) = _python_blocks(arrived["README.md"].decode())
    assert "trust_remote_code" not in snippet and "hf_moeprune" not in snippet


def test_push_without_token_fails_before_any_request(hub, pruned_dir):
    before = _folder_files(pruned_dir)
    with pytest.raises(MissingTokenError, match=r"HF_TOKEN.*hf auth login"):
        push_to_hub(pruned_dir, REPO)
    assert hub.requests == []
    assert _folder_files(pruned_dir) == before  # no card written either


def test_push_rejects_bad_inputs_before_any_request(hub, pruned_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_to_hub(tmp_path / "nowhere", REPO, token=TOKEN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        push_to_hub(tmp_path / "empty", REPO, token=TOKEN)
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        push_to_hub(pruned_dir / "config.json", REPO, token=TOKEN)
    for bad in ("a/b/c", "tester/bad..name", ""):
        with pytest.raises(ValueError, match=re.escape(f"repo_id={bad!r}")):
            push_to_hub(pruned_dir, bad, token=TOKEN)
    write_model_card(pruned_dir)
    with pytest.raises(ValueError, match="README.md' already exists"):
        push_to_hub(pruned_dir, REPO, token=TOKEN, card_info=CardInfo(method="x"))
    (pruned_dir / "notes.txt").write_text(f"my token is {TOKEN}\n")
    with pytest.raises(ValueError, match=r"notes.txt' contains your Hugging Face access token") as excinfo:
        push_to_hub(pruned_dir, REPO, token=TOKEN)
    assert TOKEN not in str(excinfo.value)
    assert hub.requests == []


def test_push_cli_positionals_and_branch(hub, pruned_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push_main([str(pruned_dir), "tester/cli-model", "--private", "--method", "REAP", "--revision", "dev"]) == 0
    assert f"{hub.url}/tester/cli-model" in capsys.readouterr().out
    repo = hub.repos["tester/cli-model"]
    assert repo.private is True
    assert [r.path for r in hub.requests][:2] == ["/api/repos/create", "/api/models/tester/cli-model/branch/dev"]
    assert repo.branches["main"] == {}  # pushed to the branch only
    readme = repo.branches["dev"]["README.md"].decode()
    assert "| Method | REAP |" in readme and 'from_pretrained("tester/cli-model")' in readme


def test_positionals_to_flags():
    assert _positionals_to_flags(["m", "a/b", "--private"]) == ["--path", "m", "--repo_id", "a/b", "--private"]
    assert _positionals_to_flags(["r.yaml", "m"]) == ["r.yaml", "--path", "m"]
    assert _positionals_to_flags(["--path", "m", "--repo_id", "a/b"]) == ["--path", "m", "--repo_id", "a/b"]


def test_push_cli_errors_are_one_line_without_token(hub, pruned_dir):
    with pytest.raises(SystemExit, match=r"hf-moeprune push: no Hugging Face token found.*HF_TOKEN"):
        push_main([str(pruned_dir), REPO])
    assert hub.requests == []
    wrong = "hf_WrongTokenForTests987654321"
    with pytest.raises(SystemExit, match="401") as excinfo:
        push_main([str(pruned_dir), REPO, "--token", wrong])
    assert wrong not in str(excinfo.value)
    paths = [r.path for r in hub.requests]
    assert paths[0] == "/api/repos/create" and not any(p.endswith(("/preupload/main", "/commit/main")) for p in paths)
    assert REPO not in hub.repos


def test_wheel_ships_the_model_card_template(tmp_path):
    """A pip-installed hf_moeprune (not only an editable checkout) finds its default model card template."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from hf_moeprune.hub import DEFAULT_TEMPLATE

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # build from a copy: pip builds in the tree and would leave build/ in the checkout
    shutil.copytree(root, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "tests", "benchmarks", "examples"))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("hf_moeprune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("hf_moeprune/model_cards/pruned_moe.md")
    assert shipped == (root / "model_cards" / "pruned_moe.md").read_bytes()
    assert DEFAULT_TEMPLATE.read_bytes() == shipped


def test_card_of_uniform_model_with_learned_bias_explains_the_format(tmp_path):
    from hf_moeprune.format import enable_selection_bias

    model = tiny_model("mixtral")
    prune_experts(model, {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [0, 2, 4, 6]})
    enable_selection_bias(model, get_adapter(model))
    model.save_pretrained(tmp_path)
    layout = expert_layout(json.loads((tmp_path / "config.json").read_text()))
    assert layout.uniform and layout.selection_bias and not layout.stock_export
    text = build_model_card(tmp_path, CardInfo(base_model="mistralai/Mixtral-8x7B-v0.1"), repo_id=REPO).content
    assert "the same expert count in every layer, learned router selection bias" in text
    assert "which the stock `mixtral` router cannot apply" in text
    assert "keep different numbers of experts" not in text
    # the remote-code snippet is offered, as for any hf_moeprune-format checkpoint
    assert any("trust_remote_code=True" in block for block in _python_blocks(text))


# ---------------------------------------------------------------- push of every model the CLI writes


def test_push_quantized_only_and_unpruned_models_with_honest_cards(hub, workspace, tmp_path):
    from hf_moeprune.commands.quantize import main as quantize_main

    ct, hfq = tmp_path / "ct", tmp_path / "hfq"
    assert quantize_main([str(workspace / "model"), str(ct), "--scheme", "int4"]) == 0
    assert quantize_main([str(workspace / "model"), str(hfq), "--scheme", "nf4"]) == 0
    plain = tmp_path / "plain"  # e.g. what `distill` writes for an unpruned student: no pruning, no quantization
    tiny_model("qwen2_moe").save_pretrained(plain)
    for folder, repo in ((ct, "tester/ct"), (hfq, "tester/hfq"), (plain, "tester/plain")):
        push_to_hub(folder, repo, token=TOKEN)
        arrived = hub.files(repo)
        assert arrived["config.json"] == (folder / "config.json").read_bytes()
        assert PLOT_FILENAME not in arrived  # nothing was pruned: no per-layer plot
    ct_card = hub.files("tester/ct")["README.md"].decode()
    assert "compressed-tensors" in ct_card.split("---")[1]  # a Hub tag
    assert "| Method | compressed-tensors pack-quantized (W4A16, symmetric int4, group size 16) |" in ct_card
    assert "## Pruning" not in ct_card and "tokenizer.json" in hub.files("tester/ct")
    (snippet,) = _python_blocks(ct_card)
    assert "hf_moeprune" not in snippet and "trust_remote_code" not in snippet
    # the card's own snippet, run where hf_moeprune cannot be imported, loads the weights and generates
    result = run_without_package(snippet.replace('"tester/ct"', repr(str(ct))) + "print('CT_OK', type(model).__name__)")
    assert "CT_OK MixtralForCausalLM" in result.stdout, result.stderr[-3000:]

    hfq_card = hub.files("tester/hfq")["README.md"].decode()
    assert "| Method | hf_moeprune nf4 (group size 64) |" in hfq_card
    (snippet,) = _python_blocks(hfq_card)
    assert snippet.startswith("import hf_moeprune") and "trust_remote_code" not in snippet
    assert "Without hf_moeprune, loading fails with an error" in hfq_card
    plain_card = hub.files("tester/plain")["README.md"].decode()
    assert "its experts were not pruned" in plain_card and "## Quantization" not in plain_card
