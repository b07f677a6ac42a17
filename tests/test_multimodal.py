"""Vision-language MoE families: the language model's experts are pruned (during training or one-shot) and the whole
model, vision tower and processor included, saves and reloads with ``AutoModelForImageTextToText`` (hf_moeprune
format, ``trust_remote_code`` without the package, stock export of a uniform layout) with exactly equal logits on
image + text and on text-only inputs."""

import json
import textwrap

import pytest
import torch
from conftest import run_without_package, tiny_vl_processor_parts, vl_image_batch, vl_image_layout
from datasets import Dataset
from train_args import train_args
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import hf_moeprune
from hf_moeprune import prune_experts
from hf_moeprune.adapters import ADAPTERS
from hf_moeprune.balancing.loads import measure_expert_loads
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.oneshot import collect_statistics, prune_oneshot
from hf_moeprune.training import MoEPruneTrainer

# composite families (a language model in text_config next to a vision tower); mistral4 loads through the same Auto
# class but is text-only
MULTIMODAL = sorted(
    name
    for name, a in ADAPTERS.items()
    if a.auto_class == "AutoModelForImageTextToText" and a.text_config_attr is not None
)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _per_layer_plan(model, adapter) -> dict[int, list[int]]:
    """Reversed kept ids, one layer keeping one expert more than the others (a real per-layer layout)."""
    groups = adapter.num_groups(model.config)
    size = adapter.num_experts_in_config(model.config) // groups
    return {
        layer: [g * size + i for g in range(groups) for i in range(size - 1 - (n % 2))][::-1]
        for n, layer in enumerate(adapter.moe_layer_indices(model))
    }


@pytest.mark.parametrize("family", MULTIMODAL)
def test_pruned_vision_language_model_reloads_with_exact_logits(family, tmp_path):
    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    layers_prefix = adapter.layers_path + "."
    vision_before = {n: p.clone() for n, p in model.named_parameters() if not n.startswith(layers_prefix)}
    plan = _per_layer_plan(model, adapter)
    prune_experts(model, plan)
    counts = [c for c in model.config.experts_per_layer if c is not None]
    assert counts == [len(plan[i]) for i in adapter.moe_layer_indices(model)]
    assert len(set(counts)) == 2 or len(counts) == 1
    # only the language model's experts changed: the vision tower, embeddings and head are the same tensors' values
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in vision_before.items())

    image = vl_image_batch(model, batch=2)
    text = {"input_ids": image["input_ids"][:, 4 + vl_image_layout(model).tokens :]}
    expected_image, expected_text = _logits(model, image), _logits(model, text)
    other_pixels = dict(image, pixel_values=image["pixel_values"] * 2)
    assert not torch.equal(_logits(model, other_pixels), expected_image)  # the image reaches the language model

    model.save_pretrained(tmp_path / "pruned", export_stock=False)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == f"moeprune_{family}"
    assert (config["expert_config_path"], config["expert_layers_path"]) == ("text_config", adapter.layers_path)
    assert config["auto_map"]["AutoModelForImageTextToText"] == f"modeling_moeprune.MoEPrune{adapter.model_class}"
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "pruned")
    assert type(reloaded).__name__ == f"MoEPrune{adapter.model_class}"
    assert torch.equal(_logits(reloaded, image), expected_image)
    assert torch.equal(_logits(reloaded, text), expected_text)
    if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(family) == adapter.model_class:  # Gemma-4: also its causal-LM class
        assert config["auto_map"]["AutoModelForCausalLM"] == config["auto_map"]["AutoModelForImageTextToText"]
        as_causal_lm = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
        assert type(as_causal_lm) is type(reloaded) and torch.equal(_logits(as_causal_lm, image), expected_image)
    else:
        assert "AutoModelForCausalLM" not in config["auto_map"]
    greedy = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    one = vl_image_batch(model, seed=1)
    assert torch.equal(
        model.generate(**one, generation_config=greedy), reloaded.generate(**one, generation_config=greedy)
    )

    # a uniform layout exports as the stock vision-language architecture, which plain transformers loads
    uniform = tiny_model(family)
    size = adapter.num_experts_in_config(uniform.config)
    groups = adapter.num_groups(uniform.config)
    keep = [g * (size // groups) + i for g in range(groups) for i in range(size // groups - 2)]
    prune_experts(uniform, dict.fromkeys(adapter.moe_layer_indices(uniform), keep))
    expected_image = _logits(uniform, image)
    uniform.save_pretrained(tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert config["text_config"][adapter.num_experts_field] == len(keep)
    assert config["moeprune_provenance"]["expert_config_path"] == "text_config"
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "stock")
    assert type(stock).__name__ == adapter.model_class
    torch.testing.assert_close(_logits(stock, image), expected_image, rtol=0, atol=1e-6)


def test_looped_layer_is_pruned_once_and_routes_on_every_pass(tmp_path):
    """Inkling-2-Loop runs its loop layers several times per forward with the same modules: pruning one changes it on
    every pass, the statistics count each pass's routing, and the pruned checkpoint reloads with the loop intact."""
    model = tiny_model(
        "inkling2_loop", n_layers_per_attn_res_block=1, loop_layer_index_start=1, loop_layer_index_end=2,
        loop_num_passes=2,
    )  # fmt: skip
    plan = _per_layer_plan(model, hf_moeprune.get_adapter(model))
    prune_experts(model, plan)
    image = vl_image_batch(model, batch=2)
    loads = measure_expert_loads(model, [image], progress=False)
    routed = image["input_ids"].numel() * 2  # top-2
    assert [loads[i].numel() for i in (0, 1, 2)] == [len(plan[i]) for i in (0, 1, 2)]
    assert [loads[i].sum().item() for i in (0, 1, 2)] == [routed, 2 * routed, routed]  # layer 1 runs twice
    expected = _logits(model, image)
    model.save_pretrained(tmp_path, export_stock=False)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert reloaded.config.text_config.loop_num_passes == 2
    assert torch.equal(_logits(reloaded, image), expected)


def test_vision_language_model_loads_with_trust_remote_code_without_the_package(tmp_path):
    model = tiny_model("qwen3_vl_moe")
    prune_experts(model, _per_layer_plan(model, hf_moeprune.get_adapter(model)))
    image = vl_image_batch(model, batch=2)
    model.save_pretrained(tmp_path / "pruned", export_stock=False)
    torch.save({"inputs": image, "expected": _logits(model, image)}, tmp_path / "io.pt")
    code = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText
        io = torch.load({str(tmp_path / "io.pt")!r})
        m = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "pruned")!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        with torch.no_grad():
            out = m(**io["inputs"]).logits
        print("REMOTE_OK" if torch.equal(out, io["expected"]) else "REMOTE_DIFF", (out - io["expected"]).abs().max().item())
        """
    )
    result = run_without_package(code, cwd=tmp_path)
    assert "REMOTE_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def _process(tokenizer, image_processor, config, image) -> dict[str, torch.Tensor]:
    """What Qwen3VLProcessor returns: the image's placeholder expanded to one token per merged patch."""
    pixels = image_processor(images=[image], return_tensors="pt")
    tokens = int(pixels["image_grid_thw"][0].prod()) // image_processor.merge_size**2
    text = "w5 w6 <|vision_start|>" + "<|image_pad|>" * tokens + "<|vision_end|> w7 w8 w9"
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    return {**pixels, "input_ids": ids, "mm_token_type_ids": (ids == config.image_token_id).long()}


def test_processor_is_saved_and_reloaded_with_the_pruned_model(tmp_path):
    """The tokenizer and image processor travel with the pruned checkpoint; reloaded from that one folder they turn an
    image and a prompt into the same inputs, and the reloaded model gives the same logits."""
    import numpy as np
    from transformers import AutoImageProcessor, AutoTokenizer

    model = tiny_model("qwen3_vl_moe")
    prune_experts(model, _per_layer_plan(model, hf_moeprune.get_adapter(model)))
    tokenizer, image_processor = tiny_vl_processor_parts(model.config)
    image = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    inputs = _process(tokenizer, image_processor, model.config, image)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path, export_stock=False)
    tokenizer.save_pretrained(tmp_path)
    image_processor.save_pretrained(tmp_path)

    again = _process(AutoTokenizer.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path),
                     model.config, image)  # fmt: skip
    assert inputs.keys() == again.keys() and all(torch.equal(inputs[k], again[k]) for k in inputs)
    assert torch.equal(_logits(AutoModelForImageTextToText.from_pretrained(tmp_path), again), expected)


def test_full_processor_round_trip(tmp_path):
    """Qwen3VLProcessor itself (it needs torchvision for its video processor)."""
    pytest.importorskip("torchvision")
    import numpy as np
    from transformers import AutoProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    model = tiny_model("qwen3_vl_moe")
    tokenizer, image_processor = tiny_vl_processor_parts(model.config)
    video = Qwen3VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video)
    image = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    prompt = ["w5 <|vision_start|><|image_pad|><|vision_end|> w7"]
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    prune_experts(model, _per_layer_plan(model, hf_moeprune.get_adapter(model)))
    model.save_pretrained(tmp_path, export_stock=False)
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)(text=prompt, images=[image], return_tensors="pt")
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded, dict(again)), _logits(model, dict(inputs)))


def _image_dataset(model, n: int = 16) -> Dataset:
    rows = []
    for i in range(n):
        batch = vl_image_batch(model, length=16, seed=i)
        per_image = ("pixel_values", "image_grid_thw")  # flattened over images, not over sequences
        rows.append({k: v.tolist() if k in per_image else v[0].tolist() for k, v in batch.items()})
    return Dataset.from_list(rows)


def _collate(rows):
    """Text ids stacked, every image's patches concatenated (the layout the model and its processor use)."""
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "mm_token_type_ids": torch.tensor([r["mm_token_type_ids"] for r in rows]),
        "pixel_values": torch.cat([torch.tensor(r["pixel_values"]) for r in rows]),
        "image_grid_thw": torch.cat([torch.tensor(r["image_grid_thw"]) for r in rows]),
    }


def test_trainer_records_statistics_and_removes_experts_on_image_text_data(tmp_path):
    model = tiny_model("qwen3_vl_moe")
    vision = {n: p.detach().clone() for n, p in model.model.visual.named_parameters()}
    args = train_args(
        tmp_path / "run", max_steps=5, prune_target=0.5, prune_schedule="oneshot", prune_start_step=2,
        prune_end_step=4, prune_criterion="reap", remove_unused_columns=False,
    )  # fmt: skip
    trainer = MoEPruneTrainer(model=model, args=args, train_dataset=_image_dataset(model), data_collator=_collate)
    trainer.train()
    counts = [c for c in model.config.experts_per_layer if c is not None]
    assert sum(counts) == 4 * len(counts)  # half of 8 experts per layer on average, removed during training
    layers = hf_moeprune.get_adapter(model).decoder_layers(model)
    assert [layer.mlp.gate.weight.shape[0] for layer in layers] == counts
    assert all(s.tokens.sum() > 0 for s in trainer.statistics.snapshot().values())
    # the vision tower trained too (its weights moved), and was not pruned
    assert any(not torch.equal(p, vision[n]) for n, p in model.model.visual.named_parameters())
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "final")
    batch = _collate([_image_dataset(model, 2)[i] for i in range(2)])
    batch.pop("labels")
    assert torch.equal(_logits(reloaded, batch), _logits(model.eval(), batch))


def test_oneshot_reap_on_image_text_calibration():
    model = tiny_model("qwen3_vl_moe")
    batches = [vl_image_batch(model, batch=4, length=16, seed=s) for s in range(2)]
    stats = collect_statistics(model, batches, progress=False)
    # every token (image placeholders included) routed to top-2 experts in every MoE layer
    assert all(s.tokens.sum() == 2 * 4 * 16 * 2 for s in stats.values())
    plan = prune_oneshot(model, batches, criterion="reap", target=0.25)
    assert model.config.experts_per_layer == [6, 6, 6]
    assert sorted(plan) == [0, 1, 2] and all(len(kept) == 6 for kept in plan.values())
    assert torch.isfinite(_logits(model, batches[0])).all()
