"""Record routing counts [layers, experts] of the demo MoE on held-out prose + code (for placement_benchmark.py).

python benchmarks/record_routing_loads.py benchmarks/results/demo_routing_loads.pt
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moeprune  # noqa: F401
from hf_moeprune.balancing.loads import measure_expert_loads
from hf_moeprune.demo import build_corpus, load_or_train_base_model
from hf_moeprune.demo.pipeline import domain_blocks


def main(out: str) -> None:
    model_dir = load_or_train_base_model()
    _, held_out = domain_blocks(build_corpus(), AutoTokenizer.from_pretrained(model_dir), 128)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.cat([torch.tensor(held_out[d]["input_ids"]) for d in ("prose", "code")])
    loads = measure_expert_loads(model, [{"input_ids": ids[i : i + 16]} for i in range(0, len(ids), 16)])
    torch.save(torch.stack([loads[i] for i in sorted(loads)]), out)
    print(f"saved routing counts of {len(ids)} blocks to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the [layers, experts] tensor (torch.save)")
    main(parser.parse_args().out)
