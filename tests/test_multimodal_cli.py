"""Vision-language MoE checkpoints through the commands: ``prune`` (streamed and in memory, from a plan or from
calibration text) and ``quantize`` / ``compress`` (hf_moeprune format and compressed-tensors) load the model with
the class its adapter names, keep the vision tower in high precision, and carry the tokenizer and image processor
into the output, which reloads with ``AutoModelForImageTextToText`` and its processor."""

import json

import pytest
import torch
from conftest import vl_image_batch
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

from hf_moeprune import get_adapter, prune_experts
from hf_moeprune.adapters import ADAPTERS
from hf_moeprune.commands import main
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.quantization.quantizer import encoder_module_names, is_quantized_tensor

PLAN = {0: [7, 1, 2, 3], 1: [0, 1, 2, 3, 4], 2: [5, 4, 3, 2]}  # per-layer counts 4, 5, 4: the hf_moeprune format
GREEDY = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _one_image(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v[:16] if k == "pixel_values" else v[:1] for k, v in inputs.items()}


def _prune(source, out, plan=PLAN, *flags) -> None:
    argv = ["--log-level", "WARNING", "prune", str(source), "--output_dir", str(out), "--keep", json.dumps(plan)]
    assert main([*argv, *flags]) == 0


def _same_processing(source, output) -> None:
    """The output's tokenizer and image processor turn a prompt and an image into what the source's do."""
    import numpy as np

    text = "w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7"
    image = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    for folder in (source, output):
        ids = AutoTokenizer.from_pretrained(folder)([text], return_tensors="pt")["input_ids"]
        pixels = AutoImageProcessor.from_pretrained(folder)(images=[image], return_tensors="pt")
        if folder == source:
            expected_ids, expected_pixels = ids, pixels
    assert torch.equal(ids, expected_ids) and ids.shape[1] == 6
    assert pixels.keys() == expected_pixels.keys()
    assert all(torch.equal(pixels[k], expected_pixels[k]) for k in pixels)


@pytest.mark.parametrize("streaming", ["true", "false"])
def test_cli_prune_of_a_vision_language_checkpoint(vl_workspace, tmp_path, streaming, capsys):
    """Streamed: the plan is applied shard by shard on a meta skeleton of the vision-language class (whose
    Qwen3-VL-MoE expert conversion reads the unpruned shapes); in memory: the model loads with its adapter's class."""
    source, out = vl_workspace / "vl", tmp_path / "pruned"
    _prune(source, out, PLAN, "--streaming", streaming)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["experts_per_layer"] == [4, 5, 4]

    reference = AutoModelForImageTextToText.from_pretrained(source)
    prune_experts(reference, PLAN)
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert type(reloaded).__name__ == "MoEPruneQwen3VLMoeForConditionalGeneration"
    adapter = get_adapter(reloaded)
    layers = adapter.decoder_layers(reloaded)
    assert [adapter.num_experts(layers[i]) for i in range(3)] == [4, 5, 4]
    assert reloaded.config.kept_expert_ids == reference.config.kept_expert_ids == [PLAN[i] for i in range(3)]
    image = vl_image_batch(reference, batch=2)
    assert torch.equal(_logits(reloaded, image), _logits(reference, image))
    text = {"input_ids": image["input_ids"][:, 8:]}
    assert torch.equal(_logits(reloaded, text), _logits(reference, text))
    assert {"tokenizer.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    _same_processing(source, out)


def test_cli_one_shot_prune_of_a_vision_language_checkpoint(vl_workspace, tmp_path, capsys):
    """``prune --data``: REAP statistics on calibration text, collected layer by layer from the checkpoint; the same
    plan as the Python API's on the whole loaded model."""
    from hf_moeprune.data import calibration_blocks
    from hf_moeprune.oneshot import collect_statistics, plan_oneshot

    source, out = vl_workspace / "vl", tmp_path / "oneshot"
    argv = ["--log-level", "WARNING", "prune", str(source), "--output_dir", str(out), "--data",
            str(vl_workspace / "cal.jsonl"), "--block_size", "16", "--target", "0.25"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["experts_per_layer"] == [6, 6, 6]
    model = AutoModelForImageTextToText.from_pretrained(source)
    blocks = calibration_blocks(str(vl_workspace / "cal.jsonl"), AutoTokenizer.from_pretrained(source), "text", 16)
    stats = collect_statistics(model, [{"input_ids": blocks[i : i + 8]} for i in range(0, len(blocks), 8)],
                               progress=False)  # fmt: skip
    prune_experts(model, plan_oneshot(model, stats, "reap", 0.25))
    reloaded = AutoModelForImageTextToText.from_pretrained(out)  # uniform: the stock class
    assert type(reloaded).__name__ == "Qwen3VLMoeForConditionalGeneration"
    saved = json.loads((out / "config.json").read_text())["moeprune_provenance"]
    assert saved["kept_expert_ids"] == model.config.kept_expert_ids
    image = vl_image_batch(model, batch=2)
    assert torch.equal(_logits(reloaded, image), _logits(model, image))


def test_cli_quantize_of_a_pruned_vision_language_model(vl_workspace, tmp_path, capsys):
    """int8 in the hf_moeprune format (per-layer counts): the language model's experts and linears are packed, the
    vision tower keeps its exact float weights (its pattern is written into quantization_config), and the output
    reloads with its processor and generates, with logits close to the unquantized model's."""
    source, pruned, out = vl_workspace / "vl", tmp_path / "pruned", tmp_path / "int8"
    _prune(source, pruned)
    capsys.readouterr()
    assert main(["--log-level", "WARNING", "quantize", str(pruned), str(out), "--scheme", "int8"]) == 0
    assert "format: hf_moeprune" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hf_moeprune" and r"^model\.visual\." in config["skip_patterns"]

    full = AutoModelForImageTextToText.from_pretrained(pruned)
    quantized = AutoModelForImageTextToText.from_pretrained(out)
    assert type(quantized).__name__ == "MoEPruneQwen3VLMoeForConditionalGeneration"
    assert quantized.config.experts_per_layer == [4, 5, 4]
    adapter = get_adapter(quantized)
    for layer in adapter.decoder_layers(quantized):
        assert is_quantized_tensor(layer.mlp.experts, "gate_up_proj") and is_quantized_tensor(
            layer.mlp.experts, "down_proj"
        )
        assert is_quantized_tensor(layer.self_attn.q_proj, "weight")
        assert not is_quantized_tensor(layer.mlp.gate, "weight")
    full_params = dict(full.named_parameters())
    vision = [(n, p) for n, p in quantized.named_parameters() if n.startswith("model.visual.")]
    assert len(vision) == sum(1 for n in full_params if n.startswith("model.visual."))
    assert all(type(p) is torch.nn.Parameter and torch.equal(p, full_params[n]) for n, p in vision)

    image = vl_image_batch(full, batch=2)
    expected, got = _logits(full, image), _logits(quantized, image)
    assert not torch.equal(got, expected)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    one = _one_image(image)
    generated = quantized.generate(**one, generation_config=GREEDY)
    assert generated.shape == (1, one["input_ids"].shape[1] + 3)
    assert torch.equal(generated[:, : one["input_ids"].shape[1]], one["input_ids"])
    _same_processing(source, out)
    # `generate` loads it with its class too (text prompts, the copied tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": 1, "prompt": "w5 w6 w7"}\n{"id": 2, "prompt": "w9 w10"}\n')
    argv = ["--log-level", "WARNING", "generate", str(out), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
            "--max_new_tokens", "4", "--progress", "false"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [(r["id"], r["tokens"], r["finish_reason"]) for r in rows] == [(1, 4, "length"), (2, 4, "length")]


def test_compress_writes_compressed_tensors_of_a_vision_language_model(tmp_path):
    """``compress`` (quantize only) of a uniformly pruned GLM-4.5V (experts stored per expert, so compressed-tensors
    holds them): the language model's Linear weights are packed, the vision tower is stored in full precision and
    listed in ``ignore``, and stock transformers reloads it with logits close to the unquantized ones."""
    source, pruned, out = tmp_path / "glm4v", tmp_path / "pruned", tmp_path / "ct"
    tiny_model("glm4v_moe").save_pretrained(source)
    _prune(source, pruned, dict.fromkeys([1, 2], [6, 0, 1, 2, 3, 5]))  # layer 0 is dense
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {pruned}\noutput_dir: {out}\nquant_scheme: int8\nquant_format: compressed-tensors\n")
    assert main(["--log-level", "WARNING", "compress", str(recipe)]) == 0

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not [k for k in keys if k.startswith("model.visual.") and "weight_packed" in k]
    assert "model.visual.blocks.0.attn.qkv.weight" in keys
    assert "model.language_model.layers.1.self_attn.q_proj.weight_packed" in keys
    assert {f"model.language_model.layers.1.mlp.experts.{i}.{p}.weight_packed" for i in range(6)
            for p in ("gate_proj", "up_proj", "down_proj")} <= keys  # fmt: skip
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.visual.blocks.0.attn.qkv" in ignore and "model.visual.merger.proj" in ignore

    full = AutoModelForImageTextToText.from_pretrained(pruned)
    quantized = AutoModelForImageTextToText.from_pretrained(out)
    assert type(quantized).__name__ == "Glm4vMoeForConditionalGeneration"
    full_params = dict(full.named_parameters())
    assert all(torch.equal(p, full_params[n]) for n, p in quantized.named_parameters() if n.startswith("model.visual."))
    image = vl_image_batch(full, batch=2)
    expected, got = _logits(full, image), _logits(quantized, image)
    assert not torch.equal(got, expected)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    one = _one_image(image)
    assert quantized.generate(**one, generation_config=GREEDY).shape == (1, one["input_ids"].shape[1] + 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["prune", "{vl}", "--output_dir", "{tmp}/out", "--keep", '{"0": [0, 9]}'],
            r"expert indices \[9\] out of range",
        ),
        (["quantize", "{pruned}", "{tmp}/out", "--format", "compressed-tensors"], "different expert counts"),
    ],
)
def test_bad_input_on_a_vision_language_checkpoint_is_one_line_exit_2(vl_workspace, tmp_path, capsys, argv, message):
    import re

    pruned = tmp_path / "pruned"
    if "{pruned}" in argv:
        _prune(vl_workspace / "vl", pruned)
    places = {"{vl}": str(vl_workspace / "vl"), "{tmp}": str(tmp_path), "{pruned}": str(pruned)}
    for placeholder, value in places.items():
        argv = [a.replace(placeholder, value) for a in argv]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["--log-level", "ERROR", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hf-moeprune {argv[0]}: error: ") and re.search(message, last), last
    assert not (tmp_path / "out").exists()


ENCODERS = {
    "aria": ["model.vision_tower", "model.multi_modal_projector"],
    "deepseek_ocr2": ["model.vision_tower", "model.multi_modal_projector"],
    "dots3_note": ["model.vision_tower", "model.audio_tower"],
    "gemma4": ["model.vision_tower", "model.embed_vision"],
    "glm4v_moe": ["model.visual"],
    "glm5_next": ["model.visual"],
    "hy_v4_vl": ["model.vision_tower"],
    "inkling2": ["model.vision_tower"],
    "inkling2_loop": ["model.vision_tower"],
    "inkling_mm_model": ["model.audio_tower", "model.vision_tower"],
    "llama4": ["vision_model", "multi_modal_projector"],
    "minimax_m3_vl": ["model.vision_tower", "model.multi_modal_projector"],
    "mistral_large4": ["model.vision_tower", "model.multi_modal_projector"],
    "muse_spark": ["model.vision_tower", "model.vision_adapter", "model.vision_projection", "model.audio_tower"],
    "qwen3_5_moe": ["model.visual"],
    "qwen3_omni_moe_thinker": ["model.audio_tower", "model.visual"],
    "qwen3_vl_moe": ["model.visual"],
    "qwen4_exp": ["model.visual"],
    "unlimited_ocr": ["model.vision_tower", "model.multi_modal_projector"],
}


# composites only: mistral4 loads through AutoModelForImageTextToText but is a text model (no tower to keep)
@pytest.mark.parametrize("family", sorted(n for n, a in ADAPTERS.items() if a.layers_path is not None))
def test_encoders_are_every_module_outside_the_language_model(family):
    """What quantization keeps in high precision: every parameter of a vision-language model is in the language model,
    the LM head, or one of these modules (a family added with other tower names must be listed here); DeepSeek-OCR's
    bare learned vectors on the model itself (view_separator, image_newline) are no module's and never quantized."""
    model = tiny_model(family)
    names = encoder_module_names(model)
    assert names == ENCODERS[family]
    outside = [n for n, _ in model.named_parameters()
               # the language model: model.language_model + lm_head, or (Llama 4) language_model with its own head
               if not n.startswith(("model.language_model.", "lm_head.", "language_model.", *(f"{e}." for e in names)))
               and n.count(".") > 1]  # fmt: skip
    assert outside == []
    assert set(ENCODERS) == {n for n, a in ADAPTERS.items() if a.layers_path is not None}
    assert encoder_module_names(tiny_model("mixtral")) == []
