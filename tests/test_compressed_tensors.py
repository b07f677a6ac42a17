"""compressed-tensors (pack-quantized W4A16 / W8A16) export: key layout, config schema, and stock loading.

The logits test loads every export in one subprocess where ``import hf_moeprune`` fails, with plain
``AutoModelForCausalLM.from_pretrained`` (transformers + compressed-tensors), and compares them with a
dense reference: the same checkpoint with each packed weight replaced by its dequantized value.
"""

import json
import math

import pytest
import torch
from conftest import run_without_package
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_moeprune import prune_experts
from hf_moeprune.commands.quantize import main as quantize_main
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.quantization import quantized_targets
from hf_moeprune.quantization.compressed_tensors_export import (
    CompressedTensorsExportConfig,
    UnsupportedLayoutError,
    choose_group_size,
    decompress_weight,
    export_compressed_tensors,
)

IDS = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(5))

# (family, scheme): the families whose stock architecture vLLM serves, int4 everywhere and int8 once
CASES = [
    ("mixtral", "int4"),
    ("mixtral", "int8"),
    ("qwen2_moe", "int4"),
    ("qwen3_moe", "int4"),
    ("olmoe", "int4"),
    ("deepseek_v2", "int4"),
    ("deepseek_v3", "int4"),
]
EXPERT_KEY = {
    "mixtral": "model.layers.0.block_sparse_moe.experts.{i}.{p}",
    "qwen2_moe": "model.layers.0.mlp.experts.{i}.{p}",
    "qwen3_moe": "model.layers.0.mlp.experts.{i}.{p}",
    "olmoe": "model.layers.0.mlp.experts.{i}.{p}",
    "deepseek_v2": "model.layers.1.mlp.experts.{i}.{p}",  # layer 0 is dense (first_k_dense_replace)
    "deepseek_v3": "model.layers.1.mlp.experts.{i}.{p}",
}
PROJECTIONS = {"mixtral": ("w1", "w2", "w3")}


def _reference(ct_dir, ref_dir):
    """The dense checkpoint a correct loader must reproduce: every packed weight dequantized in place."""
    from compressed_tensors.quantization import QuantizationScheme

    config = json.loads((ct_dir / "config.json").read_text())
    scheme = QuantizationScheme.model_validate(config.pop("quantization_config")["config_groups"]["group_0"])
    tensors = load_file(ct_dir / "model.safetensors")
    dense = {}
    for name, value in tensors.items():
        if name.endswith("weight_packed"):
            prefix = name[: -len("weight_packed")]
            parts = {k: tensors[prefix + k] for k in ("weight_packed", "weight_scale", "weight_shape")}
            dense[prefix + "weight"] = decompress_weight(parts, scheme)
        elif not name.endswith(("weight_scale", "weight_shape")):
            dense[name] = value
    ref_dir.mkdir()
    save_file(dense, ref_dir / "model.safetensors", metadata={"format": "pt"})
    (ref_dir / "config.json").write_text(json.dumps(config))
    return AutoModelForCausalLM.from_pretrained(ref_dir)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    out = {}
    for family, scheme in CASES:
        model = tiny_model(family)
        ct_dir = root / f"{family}-{scheme}"
        ct_dir.mkdir()
        summary = export_compressed_tensors(model, ct_dir, CompressedTensorsExportConfig(scheme))
        with torch.no_grad():
            fp_logits = model(IDS).logits
        out[(family, scheme)] = (ct_dir, summary, fp_logits)
    return root, out


def test_key_layout_and_config_schema(exports):
    _, out = exports
    for (family, scheme), (ct_dir, summary, _) in out.items():
        config = json.loads((ct_dir / "config.json").read_text())
        q = config["quantization_config"]
        assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
        assert q["quantization_status"] == "compressed"
        weights = q["config_groups"]["group_0"]["weights"]
        assert q["config_groups"]["group_0"]["targets"] == ["Linear"]
        assert weights["type"] == "int" and weights["symmetric"] is True and weights["dynamic"] is False
        if scheme == "int4":
            assert weights["num_bits"] == 4 and weights["strategy"] == "group"
            # tiny widths (e.g. 32, 48, 24) are not multiples of 128: the largest common divisor <= 128 is used
            assert weights["group_size"] == summary.group_size == {"mixtral": 16}.get(family, 8)
        else:
            assert weights["num_bits"] == 8 and weights["strategy"] == "channel" and weights["group_size"] is None
        assert "lm_head" in q["ignore"]
        assert all("gate" in name.rsplit(".", 1)[-1] or name == "lm_head" for name in q["ignore"]), q["ignore"]
        with safe_open(ct_dir / "model.safetensors", "pt") as f:
            keys = set(f.keys())
            projections = PROJECTIONS.get(family, ("gate_proj", "down_proj", "up_proj"))
            template = EXPERT_KEY[family]
            for i in (0, 7):
                for p in projections:
                    base = template.format(i=i, p=p)
                    assert {f"{base}.weight_packed", f"{base}.weight_scale", f"{base}.weight_shape"} <= keys, base
                    assert f"{base}.weight" not in keys
                    packed = f.get_slice(f"{base}.weight_packed")
                    out_f, in_f = f.get_tensor(f"{base}.weight_shape").tolist()
                    assert packed.get_dtype() == "I32"
                    assert packed.get_shape() == [out_f, math.ceil(in_f * (4 if scheme == "int4" else 8) / 32)]
                    groups = in_f // summary.group_size if scheme == "int4" else 1
                    assert f.get_slice(f"{base}.weight_scale").get_shape() == [out_f, groups]
            assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
            assert any(k.endswith("self_attn.o_proj.weight_packed") for k in keys)
            assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys


def test_stock_transformers_loads_every_family_without_hf_moeprune(exports, tmp_path):
    root, out = exports
    names = [f"{family}-{scheme}" for family, scheme in CASES]
    code = (
        "import json, torch\n"
        "from safetensors.torch import save_file\n"
        "from transformers import AutoModelForCausalLM\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "logits, infos = {}, {}\n"
        f"for name in {names!r}:\n"
        f"    m, info = AutoModelForCausalLM.from_pretrained({str(root)!r} + '/' + name, output_loading_info=True)\n"
        "    infos[name] = {k: sorted(map(str, v)) for k, v in info.items()}\n"
        "    with torch.no_grad():\n"
        "        logits[name] = m(ids).logits.contiguous()\n"
        f"save_file(logits, {str(tmp_path / 'logits.safetensors')!r})\n"
        "print(json.dumps(infos))\n"
    )
    result = run_without_package(code)
    assert result.returncode == 0, result.stderr[-3000:]
    infos = json.loads(result.stdout.strip().splitlines()[-1])
    loaded = load_file(tmp_path / "logits.safetensors")
    for family, scheme in CASES:
        name = f"{family}-{scheme}"
        assert infos[name] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        ct_dir, _, fp_logits = out[(family, scheme)]
        with torch.no_grad():
            expected = _reference(ct_dir, tmp_path / f"ref-{name}")(IDS).logits
        torch.testing.assert_close(loaded[name], expected, rtol=1e-5, atol=1e-5, msg=name)
        # the reference is the quantized model, not the full-precision one (the test could not pass otherwise)
        assert not torch.allclose(expected, fp_logits, atol=1e-4), name
        cosine = torch.nn.functional.cosine_similarity(expected.flatten(), fp_logits.flatten(), dim=0)
        assert cosine > (0.99 if scheme == "int4" else 0.9999), (name, cosine)


def test_group_size_choice():
    assert choose_group_size([4096, 14336], None) == 128
    assert choose_group_size([32, 48], None) == 16
    assert choose_group_size([96, 160], None) == 32
    assert choose_group_size([4096], 64) == 64
    with pytest.raises(ValueError, match=r"group_size=128 does not divide the input width\(s\) \[48\]"):
        choose_group_size([128, 48], 128)
    with pytest.raises(ValueError, match="one scale per output channel"):
        CompressedTensorsExportConfig("int8", group_size=64)
    with pytest.raises(ValueError, match="scheme 'nf4' has no compressed-tensors form"):
        CompressedTensorsExportConfig("nf4")


def test_refusals_name_the_reason(tmp_path):
    # GPT-OSS: transformers 5.24 stores its experts fused (no per-expert conversion), so nothing loads them
    (tmp_path / "a").mkdir()
    with pytest.raises(UnsupportedLayoutError, match=r"gpt_oss's experts as fused 3D tensors .*experts\."):
        export_compressed_tensors(tiny_model("gpt_oss"), tmp_path / "a", CompressedTensorsExportConfig("int4"))
    model = tiny_model("mixtral")
    prune_experts(model, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3, 4, 5], 2: [0, 1, 2, 3]})
    (tmp_path / "b").mkdir()
    with pytest.raises(UnsupportedLayoutError, match=r"moeprune_mixtral.*\[4, 6, 4\].*different expert counts"):
        export_compressed_tensors(model, tmp_path / "b", CompressedTensorsExportConfig("int4"))


def test_pruned_uniform_model_exports_with_provenance(tmp_path):
    model = tiny_model("qwen3_moe")
    prune_experts(model, {i: [6, 1, 3, 4] for i in range(3)})
    summary = export_compressed_tensors(model, tmp_path, CompressedTensorsExportConfig("int4"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_local_experts"] == 4
    assert config["moeprune_provenance"]["kept_expert_ids"] == [[6, 1, 3, 4]] * 3
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.2.mlp.experts.3.down_proj.weight_packed" in keys
    assert not any(".experts.4." in k for k in keys)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4 and summary.quantized_tensors > 0


def test_cli_default_format_and_refusal(workspace, tmp_path, capsys):
    out = tmp_path / "q"
    assert quantize_main([str(workspace / "model"), str(out), "--scheme", "int4"]) == 0
    assert "format: compressed-tensors W4A16" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not (out / ".fp-staging").exists()
    # the README's chain: quantize, then generate from the quantized folder (its own tokenizer)
    from hf_moeprune.commands.generate import main as generate_main

    prompts, results = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text('{"id": "a", "prompt": "def load"}\n{"id": "b", "prompt": "return the"}\n')
    argv = [str(out), "--prompts", str(prompts), "--out", str(results), "--max-new-tokens", "4", "--progress", "false"]
    assert generate_main(argv) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(r["tokens"] == 4 and r["completion"] for r in rows)

    tiny_model("gpt_oss").save_pretrained(tmp_path / "oss")
    with pytest.raises(SystemExit, match="--format compressed-tensors: transformers writes gpt_oss's experts"):
        quantize_main([str(tmp_path / "oss"), str(tmp_path / "bad"), "--format", "compressed-tensors"])
    with pytest.raises(SystemExit, match="scheme='nf4' has no compressed-tensors form"):
        quantize_main(
            [str(tmp_path / "oss"), str(tmp_path / "bad"), "--format", "compressed-tensors", "--scheme", "nf4"]
        )
    assert not (tmp_path / "bad").exists()
    # auto falls back to the hf_moeprune format for GPT-OSS, and says so
    assert quantize_main([str(tmp_path / "oss"), str(tmp_path / "auto"), "--scheme", "int4"]) == 0
    assert "format: hf_moeprune" in capsys.readouterr().out
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hf_moeprune"
    assert quantized_targets(AutoModelForCausalLM.from_pretrained(tmp_path / "auto"))
