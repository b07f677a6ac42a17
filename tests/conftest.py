import inspect
import json
import json as json_module
import os
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import hf_moeprune  # noqa: F401  (registers the pruned-model classes)
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
