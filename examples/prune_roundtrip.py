"""Prune a tiny Mixtral with different expert counts per layer, save it, reload it, compare logits.

python examples/prune_roundtrip.py [--out /tmp/pruned-mixtral]
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM

import hf_moeprune
from hf_moeprune.demo.tiny_models import tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    out = parser.parse_args().out or tempfile.mkdtemp(prefix="pruned-mixtral-")

    model = tiny_model("mixtral")  # 3 layers x 8 experts, random weights
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    params_before = sum(p.numel() for p in model.parameters())

    hf_moeprune.prune_experts(model, {0: [0, 1, 2, 3, 4, 5], 1: [1, 3, 5, 7], 2: [0, 2, 4, 6, 7]})
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        same = torch.equal(reloaded(ids).logits, logits)
    params_after = sum(p.numel() for p in reloaded.parameters())
    print(f"saved to {out} as {reloaded.config.model_type}")
    print(f"experts per layer: {reloaded.config.experts_per_layer} (kept ids {reloaded.config.kept_expert_ids})")
    print(f"parameters: {params_before:,} -> {params_after:,}; reloaded logits identical: {same}")
    if not same:
        raise SystemExit("reloaded logits differ")


if __name__ == "__main__":
    main()
