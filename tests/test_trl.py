"""Pruning composes with TRL (SFTTrainer through MoEPruneMixin) and with stock aux-loss code on non-uniform models."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import hf_moeprune
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.format import heterogeneous_load_balancing_loss

trl_support = pytest.importorskip("hf_moeprune.training.trl_support")

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "the",
    "dog",
    "ran",
    "to",
    "the",
    "park",
    "and",
    "a",
    "bird",
    "sang",
    "in",
    "the",
    "old",
    "tree",
]


def _non_uniform():
    model = tiny_model("mixtral")
    hf_moeprune.prune_experts(model, {0: [7, 1, 4, 0, 2], 2: [3, 6]})  # widths 5, 8, 2
    return model


def test_non_uniform_router_logits_are_padded_for_the_stock_loss():
    model = _non_uniform()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask)
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        backbone = model.model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert torch.equal(out.logits, plain.logits), "padding changes no routing decision"
    widths = [5, 8, 2]
    for logits, width in zip(backbone.router_logits, widths):
        assert logits.shape[-1] == 8
        assert torch.isinf(logits[:, width:]).all() and torch.isfinite(logits[:, :width]).all()
    # the stock function runs on the padded logits; per layer it equals the unpadded loss up to its E factor
    stock = load_balancing_loss_func(backbone.router_logits, 8, 2, mask)
    assert math.isfinite(stock.item())
    for logits, width in zip(backbone.router_logits, widths):
        padded = load_balancing_loss_func((logits,), 8, 2, mask)
        own = load_balancing_loss_func((logits[:, :width],), width, 2, mask)
        torch.testing.assert_close(padded * width / 8, own)
    # the model's own aux loss is still the per-layer one, computed on the layers' real widths
    raw = [logits[:, :width] for logits, width in zip(backbone.router_logits, widths)]
    torch.testing.assert_close(out.aux_loss, heterogeneous_load_balancing_loss(raw, 2, mask))


def _tokenizer():
    from hf_moeprune.demo.base_model import TokenizerConfig, train_tokenizer

    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=300, min_frequency=1))
    tokenizer.pad_token = tokenizer.eos_token = tokenizer.eos_token or "<|endoftext|>"
    return tokenizer


def _text_dataset(n=32):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, len(WORDS), (1,), generator=g))
        rows.append(" ".join((WORDS * 2)[start : start + 10]))
    return Dataset.from_dict({"text": rows})


def _config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-3,
                report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0, data_seed=0,
                disable_tqdm=True, max_length=32, prune_target=0.5, prune_schedule="oneshot", prune_start_step=2,
                prune_allocation="global", router_aux_loss_coef=0.02)  # fmt: skip
    base.update(overrides)
    return trl_support.MoEPruneSFTConfig(**base)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trl")
    tokenizer = _tokenizer()
    model = tiny_model("mixtral", vocab_size=len(tokenizer))
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])  # fmt: skip
    trainer = trl_support.MoEPruneSFTTrainer(model=model, args=_config(tmp), train_dataset=_text_dataset(),
                                             processing_class=tokenizer, peft_config=peft_config)  # fmt: skip
    trainer.train()
    return trainer, tokenizer


def test_sft_trainer_prunes_a_lora_run(sft_run):
    trainer, _ = sft_run
    from peft import PeftModel

    assert isinstance(trainer.model, PeftModel)
    counts = trainer.moe_model.config.experts_per_layer
    assert sum(counts) == 12 and len(set(counts)) > 1, counts
    history = trainer.state.log_history
    losses = [h for h in history if "loss" in h]
    assert [h["step"] for h in losses] == list(range(1, 7))
    assert all(math.isfinite(h["loss"]) and "mean_token_accuracy" in h for h in losses)  # TRL's metrics kept
    assert [h["step"] for h in history if "prune/experts/total" in h] == [2]
    for layer, count in enumerate(counts):
        experts = trainer.moe_model.model.layers[layer].mlp.experts
        assert experts.num_experts == count and experts.lora_A["default"].weight.shape[0] == 4 * count


def test_sft_aux_loss_is_counted_once(sft_run):
    trainer, tokenizer = sft_run
    assert trainer.aux_loss_enabled is False and trainer.moe_model.config.output_router_logits is False
    batch = tokenizer(["the cat sat on a mat", "a bird sang in the old tree"], return_tensors="pt", padding=True)
    inputs = {**batch, "labels": batch["input_ids"].clone()}
    trainer.model.train()
    coef = trainer._aux_coef
    seen = []
    take = trainer.instrumentation.take_router_logits
    trainer.instrumentation.take_router_logits = lambda: seen.append(take()) or seen[-1]
    with torch.no_grad():
        total = trainer.compute_loss(trainer.model, dict(inputs))
        del trainer.instrumentation.take_router_logits
        (logits,) = seen
        assert len(logits) == 3
        trainer._aux_coef = 0.0
        try:
            plain = trainer.compute_loss(trainer.model, dict(inputs))
        finally:
            trainer._aux_coef = coef
    aux = heterogeneous_load_balancing_loss(logits, 2, batch["attention_mask"])
    assert coef == 0.02
    torch.testing.assert_close(total, plain + coef * aux)
    # TRL's fused forward on the non-uniform pruned model, router logits on: the stock function runs on padded logits
    with torch.no_grad():
        fused = trainer.model(**inputs, fused_lm_head=True, output_router_logits=True)
    assert fused.aux_loss is not None and math.isfinite(fused.aux_loss.item())


def test_mixin_order_and_arguments_are_checked(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from hf_moeprune.training import MoEPruneMixin

    with pytest.raises(TypeError, match=r"list MoEPruneMixin before SFTTrainer"):
        type("Reversed", (SFTTrainer, MoEPruneMixin), {})
    with pytest.raises(TypeError, match="needs arguments that include MoEPruneArgumentsMixin"):
        trl_support.MoEPruneSFTTrainer(model=tiny_model("mixtral"), args=SFTConfig(str(tmp_path), use_cpu=True))
