"""Vision-language MoE families: the language model's experts are pruned (during training or one-shot) and the whole
model, vision tower and processor included, saves and reloads with ``AutoModelForImageTextToText`` (hf_moeprune
format, ``trust_remote_code`` without the package, stock export of a uniform layout) with exactly equal logits on
image + text and on text-only inputs."""

import inspect
import json
import textwrap

import pytest
import torch
from conftest import run_without_package
from datasets import Dataset
from transformers import AutoModelForImageTextToText, GenerationConfig

import hf_moeprune
from hf_moeprune import prune_experts
from hf_moeprune.adapters import ADAPTERS
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.oneshot import collect_statistics, prune_oneshot
from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer

MULTIMODAL = sorted(name for name, a in ADAPTERS.items() if a.auto_class == "AutoModelForImageTextToText")
GRID = torch.tensor([[1, 4, 4]])  # one image of 4 x 4 patches, merged 2 x 2 into 4 image tokens


def _whole_images(model) -> bool:
    """Whether the model takes whole images ``[images, 3, size, size]`` (Llama 4) rather than the Qwen-VL layout of
    patches flattened over the images with a (t, h, w) grid per image."""
    return "image_grid_thw" not in inspect.signature(model.forward).parameters


def _image_batch(model, batch: int = 1, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of ``[text, <start>, 4 image tokens, <end>, text]`` sequences with one random image each, in the input
    format of the Qwen-VL / GLM-4V / dots3 families (patches flattened over the batch, a (t, h, w) grid per image;
    ``mm_token_type_ids`` where the model's forward takes them), or Llama 4's (one 16 x 16 image per sequence, whose
    16 patches are pixel-shuffled into 4 tokens)."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, length), generator=g)
    start = getattr(config, "vision_start_token_id", None) or getattr(config, "image_start_token_id", None)
    end = getattr(config, "vision_end_token_id", None) or getattr(config, "image_end_token_id", None)
    if _whole_images(model):
        start, end = getattr(config, "boi_token_id", None), getattr(config, "eoi_token_id", None)
    if start is not None:
        ids[:, 2] = start
    if end is not None:
        ids[:, 7] = end
    ids[:, 3:7] = config.image_token_id
    vision = config.vision_config
    if _whole_images(model):
        size = vision.image_size
        return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    patch = 3 * getattr(vision, "temporal_patch_size", 1) * vision.patch_size**2
    inputs = {
        "input_ids": ids,
        "pixel_values": torch.randn(batch * 16, patch, generator=g),
        "image_grid_thw": GRID.repeat(batch, 1),
    }
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).long()
    return inputs


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

    image = _image_batch(model, batch=2)
    text = {"input_ids": image["input_ids"][:, 8:]}
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
    greedy = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    one = {k: v[:1] if k != "pixel_values" or _whole_images(model) else v[:16] for k, v in image.items()}
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


def test_vision_language_model_loads_with_trust_remote_code_without_the_package(tmp_path):
    model = tiny_model("qwen3_vl_moe")
    prune_experts(model, _per_layer_plan(model, hf_moeprune.get_adapter(model)))
    image = _image_batch(model, batch=2)
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


def _tiny_processor_parts(config):
    """A word-level tokenizer whose special tokens sit at the config's ids, and Qwen-VL's image processor (4 x 4 pixel
    patches, 2 x 2 merge): built locally, nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    specials = {
        "<|image_pad|>": config.image_token_id,
        "<|video_pad|>": config.video_token_id,
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
    }
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 150)}, **specials}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
        additional_special_tokens=list(specials),
    )  # fmt: skip
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 256, "longest_edge": 256}
    )
    return tokenizer, image_processor


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
    tokenizer, image_processor = _tiny_processor_parts(model.config)
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
    tokenizer, image_processor = _tiny_processor_parts(model.config)
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
        batch = _image_batch(model, length=16, seed=i)
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
    args = MoEPruneArguments(
        output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=4, learning_rate=2e-3,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0, prune_target=0.5,
        prune_schedule="oneshot", prune_start_step=2, prune_end_step=4, prune_criterion="reap",
        remove_unused_columns=False, disable_tqdm=True,
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
    batches = [_image_batch(model, batch=4, length=16, seed=s) for s in range(2)]
    stats = collect_statistics(model, batches, progress=False)
    # every token (image placeholders included) routed to top-2 experts in every MoE layer
    assert all(s.tokens.sum() == 2 * 4 * 16 * 2 for s in stats.values())
    plan = prune_oneshot(model, batches, criterion="reap", target=0.25)
    assert model.config.experts_per_layer == [6, 6, 6]
    assert sorted(plan) == [0, 1, 2] and all(len(kept) == 6 for kept in plan.values())
    assert torch.isfinite(_logits(model, batches[0])).all()
