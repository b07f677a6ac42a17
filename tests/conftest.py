import inspect
import json
import json as json_module
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import hf_moeprune  # noqa: F401  (registers the pruned-model classes)
from hf_moeprune.adapters import get_adapter
from hf_moeprune.demo.tiny_models import TINY_CONFIGS, tiny_model

# The per-family deep suite (surgery invariants, selection bias, quantization, trust_remote_code per family) runs on
# these representatives of every routing rule and layout; every registered family runs tests/test_families.py and
# tests/test_routing.py.
FAMILIES = sorted(
    {
        "mixtral",
        "minimax",
        "qwen2_moe",
        "qwen3_moe",
        "qwen3_next",
        "olmoe",
        "flex_olmo",
        "deepseek_v3",
        "glm4_moe",
        "dots1",
        "gpt_oss",
        "granitemoe",
        "deepseek_v2",
        "jamba",
        "hunyuan_v1_moe",
        "gemma4_text",  # router and experts on the decoder layer itself, a router that returns probabilities
    }  # fmt: skip
)
assert set(FAMILIES) <= set(TINY_CONFIGS)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tiny Mixtral with a word-level tokenizer (trained on the json module's source) and a JSONL corpus."""
    root = tmp_path_factory.mktemp("cli")
    lines = inspect.getsource(json_module).splitlines()
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        lines, trainers.WordLevelTrainer(vocab_size=128, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tiny_model("mixtral").save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    rows = [json.dumps({"body": " ".join(lines[i : i + 20])}) for i in range(0, len(lines), 20)]
    (root / "data.jsonl").write_text("\n".join(rows))
    return root


# -- vision-language models ------------------------------------------------------------------------------------
VL_GRID = torch.tensor([[1, 4, 4]])  # one image of 4 x 4 patches, merged 2 x 2 into 4 image tokens


def _patches(config, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Qwen-VL / GLM-4V / dots3 / MiniMax-M3-VL / HY-V4-VL / Muse-Spark: t x p x p patches flattened over the batch, a
    (t, h, w) patch grid per image."""
    vision = config.vision_config
    temporal = getattr(vision, "temporal_patch_size", None) or getattr(vision, "patch_temporal", 1)
    patch = 3 * temporal * vision.patch_size**2
    return {"pixel_values": torch.randn(batch * 16, patch, generator=g), "image_grid_thw": VL_GRID.repeat(batch, 1)}


def _images(size: int, **per_image):
    """Families that take whole images [batch, 3, size, size] (plus per-image extras such as a pixel mask)."""

    def pixels(config, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        extras = {name: make(batch) for name, make in per_image.items()}
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g), **extras}

    return pixels


def _gemma4_pixels(config, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Gemma-4: one sequence of 16 patches (values in [0, 1]) per image with their (x, y) positions; the vision tower
    pools 2 x 2 patches into one soft token."""
    positions = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1).reshape(16, 2)
    return {
        "pixel_values": torch.rand(batch, 16, 3 * config.vision_config.patch_size**2, generator=g),
        "image_position_ids": positions.repeat(batch, 1, 1),
    }


def _inkling2_pixels(config, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Inkling-2: one block of merge x merge patches per image token (values in [-1, 1]), the grid counted in image
    tokens."""
    side = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    return {
        "pixel_values": torch.rand(batch * 4, side, side, 3, generator=g) * 2 - 1,
        "image_grid_thw": torch.tensor([[1, 2, 2]]).repeat(batch, 1),
    }


def _inkling_pixels(config, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Inkling (inkling_mm_model): one placeholder token per patch, each patch [temporal, height, width, channels]."""
    vision = config.vision_config
    patch = (getattr(vision, "temporal_patch_size", 1), vision.patch_size, vision.patch_size, vision.num_channels)
    return {"pixel_values": torch.randn(batch * 4, *patch, generator=g)}


def _whole_image(config, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Llama 4: one whole image [3, image_size, image_size] per sequence (its 16 patches pixel-shuffled into 4 tokens)."""
    size = config.vision_config.image_size
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


@dataclass(frozen=True)
class ImageLayout:
    """How a family's model takes one image per sequence: the image tokens the tiny config's tower turns it into, and
    the pixel inputs."""

    tokens: int
    pixels: Callable[[object, int, torch.Generator], dict[str, torch.Tensor]]

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens}; an image is at least one token")


QWEN_LAYOUT = ImageLayout(4, _patches)
IMAGE_LAYOUTS = {  # families not listed take Qwen-VL's
    "gemma4": ImageLayout(4, _gemma4_pixels),
    "inkling2": ImageLayout(4, _inkling2_pixels),
    "inkling2_loop": ImageLayout(4, _inkling2_pixels),
    "inkling_mm_model": ImageLayout(4, _inkling_pixels),
    "llama4": ImageLayout(4, _whole_image),
    "hy_v4_vl": ImageLayout(6, _patches),  # 2 merged rows of 2, each row followed by a newline token
    "aria": ImageLayout(4, _images(16, pixel_mask=lambda b: torch.ones(b, 16, 16, dtype=torch.bool))),
    "mistral_large4": ImageLayout(4, _images(16, image_sizes=lambda b: torch.tensor([[16, 16]] * b))),
    "deepseek_ocr2": ImageLayout(145, _images(64)),  # 144 learned queries + a view separator
    "unlimited_ocr": ImageLayout(3, _images(64)),
}


def vl_image_layout(model) -> ImageLayout:
    return IMAGE_LAYOUTS.get(get_adapter(model).model_type, QWEN_LAYOUT)


def _first_token_id(config, names: tuple[str, ...]) -> int | None:
    return next((v for name in names if (v := getattr(config, name, None)) is not None), None)


def vl_image_batch(model, batch: int = 1, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of ``[text, <start>, image tokens, <end>, text]`` sequences with one random image each, in the input
    format of the model's family (`IMAGE_LAYOUTS`; ``mm_token_type_ids`` where the model's forward takes them).
    ``length`` counts the image as 4 tokens; the text after the image starts at ``4 + layout.tokens``."""
    config = model.config
    layout = vl_image_layout(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, length - 4 + layout.tokens), generator=g)
    start = _first_token_id(config, ("vision_start_token_id", "image_start_token_id", "boi_token_id"))
    end = _first_token_id(config, ("vision_end_token_id", "image_end_token_id", "eoi_token_id"))
    if start is not None:
        ids[:, 2] = start
    if end is not None:
        ids[:, 3 + layout.tokens] = end
    ids[:, 3 : 3 + layout.tokens] = config.image_token_id
    inputs = {"input_ids": ids, **layout.pixels(config, batch, g)}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).long()
    return inputs


def tiny_vl_processor_parts(config):
    """A word-level tokenizer (words ``w3`` .. ``w149``) whose special tokens sit at the config's ids, and Qwen-VL's
    image processor (4 x 4 pixel patches, 2 x 2 merge): built locally, nothing downloaded."""
    from transformers import Qwen2VLImageProcessorPil

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


@pytest.fixture(scope="session")
def vl_workspace(tmp_path_factory):
    """A tiny Qwen3-VL-MoE checkpoint with its tokenizer and image processor (``vl/``), and calibration text in the
    tokenizer's words (``cal.jsonl``, field ``text``)."""
    import random

    root = tmp_path_factory.mktemp("vl-cli")
    model = tiny_model("qwen3_vl_moe")
    tokenizer, image_processor = tiny_vl_processor_parts(model.config)
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(root / "vl")
    words = random.Random(0)
    rows = [{"text": " ".join(f"w{words.randint(3, 149)}" for _ in range(40))} for _ in range(12)]
    (root / "cal.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


class RoutingRecorder:
    """Records, per decoder layer, the router's (logits, top-k weights, top-k indices) of each forward."""

    def __init__(self, model):
        self.adapter = hf_moeprune.get_adapter(model)
        self.calls: dict[int, tuple] = {}
        self.handles = []
        for idx in self.adapter.moe_layer_indices(model):
            router = self.adapter.router(self.adapter.decoder_layers(model)[idx])
            self.handles.append(router.register_forward_hook(self._hook(idx)))

    def _hook(self, idx):
        def hook(module, args, output):
            logits, weights, indices = output[:3]  # Inkling returns the shared experts' weights too
            self.calls[idx] = (logits.detach(), weights.detach(), indices.detach())

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def run_without_package(code: str, cwd=None):
    """Run python code in a subprocess in which `import hf_moeprune` fails."""
    import subprocess

    blocker = (
        "import sys, importlib.abc\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'hf_moeprune' or name.startswith('hf_moeprune.'):\n"
        "            raise ImportError('hf_moeprune is blocked in this test')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    # same thread count as this process: BLAS reductions split differently across threads
    threads = str(torch.get_num_threads())  # MKL's too: an inherited MKL_NUM_THREADS=1 changes the matmul splits
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return subprocess.run(
        [sys.executable, "-c", blocker + code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )
