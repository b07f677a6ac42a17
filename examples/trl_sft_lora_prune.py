"""Fine-tune an MoE model with TRL's SFTTrainer and LoRA while removing half of its routed experts.

python examples/trl_sft_lora_prune.py [--out /tmp/sft-lora-prune] [--steps 30]

A demo-sized random-init Mixtral (4 layers x 8 experts) learns Python source text from the standard library; LoRA
on attention and on every expert (peft ``target_parameters``); REAP pruning removes 50% of the experts at step
``steps // 3`` (different counts per layer). Then the adapter + pruned base reload through peft, and the merged
model through plain ``AutoModelForCausalLM``, with the same logits. Runs on CPU in about a minute.
For a real checkpoint, swap the model/tokenizer/dataset lines; everything else stays.
"""

import argparse
import inspect
import json
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

import hf_moeprune  # noqa: F401  (registers the pruned model classes with the Auto* factories)
from hf_moeprune.demo.base_model import TokenizerConfig, train_tokenizer
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.lora import merge_saved_lora
from hf_moeprune.training.trl_support import MoEPruneSFTConfig, MoEPruneSFTTrainer


def corpus() -> list[str]:
    import dataclasses as source_a
    import json as source_b

    lines = [line for m in (source_a, source_b) for line in inspect.getsource(m).splitlines() if line.strip()]
    return [" ".join(lines[i : i + 12]) for i in range(0, len(lines), 12)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=30)
    cli = parser.parse_args()
    out = Path(cli.out or tempfile.mkdtemp(prefix="sft-lora-prune-"))

    texts = corpus()
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=512, min_frequency=2))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = tiny_model("mixtral", vocab_size=len(tokenizer), num_hidden_layers=4, hidden_size=64,
                       intermediate_size=128)  # fmt: skip
    dataset = Dataset.from_dict({"text": texts})

    args = MoEPruneSFTConfig(
        output_dir=str(out / "run"), max_steps=cli.steps, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0, max_length=64, disable_tqdm=True,
        bf16=False,  # SFTConfig defaults to bf16 autocast; fp32 here so the reload comparison below is exact
        # pruning: REAP scores, half the routed experts, all at once a third into training, per-layer counts
        prune_criterion="reap", prune_target=0.5, prune_schedule="oneshot", prune_start_step=cli.steps // 3,
        prune_allocation="global",
    )  # fmt: skip
    peft_config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],  # per-expert LoRA
    )  # fmt: skip
    trainer = MoEPruneSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))  # adapter + adapter/base_model (the pruned base)
    merge_saved_lora(str(out / "adapter"), str(out / "merged"))  # one plain pruned model

    ids = tokenizer(texts[:2], return_tensors="pt", padding=True, truncation=True, max_length=32)["input_ids"]
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(out / "adapter" / "base_model")
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(input_ids=ids).logits
    losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
    summary = {
        "output": str(out),
        "experts_per_layer": trainer.moe_model.config.experts_per_layer,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "loss_curve": losses,
        "adapter_reload_identical": bool(torch.equal(adapted, expected)),
        "merged_max_abs_diff": float((merged - expected).abs().max()),
    }
    print(json.dumps(summary, indent=2))
    if not summary["adapter_reload_identical"] or summary["merged_max_abs_diff"] > 1e-4:
        raise SystemExit("reloaded logits differ")


if __name__ == "__main__":
    main()
