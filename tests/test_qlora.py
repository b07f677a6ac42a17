"""QLoRA runs of MoEPruneTrainer: a 4-bit base whose fused experts are packed too (hf_moeprune.quantize), LoRA on
the attention projections through peft, experts removed mid-training from the packed tensors and their scales."""

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_trainer import _args, _dataset
from transformers import AutoModelForCausalLM, TrainerCallback

import hf_moeprune
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.lora import merge_saved_lora
from hf_moeprune.quantization import model_size_bytes, quantized_targets
from hf_moeprune.surgery import unwrap_model
from hf_moeprune.training import MoEPruneTrainer


def _qlora(scheme="nf4", seed=0):
    torch.manual_seed(seed)
    base = hf_moeprune.quantize(tiny_model("mixtral"), scheme=scheme)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, config)


def _experts(model, layer):
    return unwrap_model(model).model.layers[layer].mlp.experts


def _packed(experts, name):
    chain = experts.parametrizations[name]
    return chain.original0.detach().clone(), chain.original1.detach().clone()


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fused_experts_are_packed_and_the_base_is_mostly_4bit():
    model = tiny_model("mixtral", num_local_experts=8, intermediate_size=256)
    fp32 = model_size_bytes(model)
    hf_moeprune.quantize(model, scheme="nf4")
    names = quantized_targets(model)
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.experts.down_proj" in names
    # experts dominate this config: the 4-bit base is well under a third of the fp32 one
    assert model_size_bytes(model) < fp32 / 3, (model_size_bytes(model), fp32)


@pytest.mark.parametrize("scheme", ["nf4", "int4"])
def test_removal_slices_packed_codes_and_scales(scheme):
    model = _qlora(scheme)
    experts = _experts(model, 1)
    dense = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    packed = {n: _packed(experts, n) for n in dense}
    keep = [6, 0, 3]
    hf_moeprune.prune_experts(model, {1: keep})
    for name, before in dense.items():
        weight = getattr(experts, name)
        assert weight.shape[0] == 3
        assert torch.equal(weight, before[keep]), name  # kept experts dequantize bit-identically
        codes, scales = _packed(experts, name)
        old_codes, old_scales = packed[name]
        assert codes.dtype == old_codes.dtype and codes.shape[0] * 8 == old_codes.shape[0] * 3
        assert scales.shape[0] * 8 == old_scales.shape[0] * 3
        for new, old in ((codes, old_codes), (scales, old_scales)):
            assert torch.equal(
                new, old.reshape(8, -1, *old.shape[1:])[keep].reshape(old.shape[0] * 3 // 8, *old.shape[1:])
            )
    assert experts.num_experts == 3 and unwrap_model(model).config.experts_per_layer[1] == 3
    ids = torch.randint(0, 128, (2, 8))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert math.isfinite(loss.item())


def test_groups_straddling_experts_are_refused_before_anything_changes():
    model = hf_moeprune.quantize(tiny_model("mixtral"), scheme="int8", group_size=5000)  # experts: 3072 values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = [list(ids) for ids in model.config.kept_expert_ids]
    with pytest.raises(ValueError, match="straddle experts of 3072 values"):
        hf_moeprune.prune_experts(model, {0: [0, 1, 2]})
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert model.config.kept_expert_ids == kept and model.model.layers[0].mlp.experts.num_experts == 8


class _AdapterWatch(TrainerCallback):
    """Adapter weights right after the removal step."""

    def __init__(self, trainer, step):
        self.trainer, self.step, self.adapters = trainer, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.adapters = _lora(self.trainer.model)


class _Watch(_AdapterWatch):
    """Also the packed experts right before and right after the removal step."""

    def __init__(self, trainer, step):
        super().__init__(trainer, step)
        self.before = self.after = None

    def _snapshot(self):
        model = self.trainer.model
        layers = unwrap_model(model).model.layers
        dense = [layer.mlp.experts.gate_up_proj.detach().clone() for layer in layers]
        return dense, [_packed(layer.mlp.experts, "gate_up_proj") for layer in layers]

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            self.before = self._snapshot()

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if state.global_step == self.step:
            self.after = self._snapshot()


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    common = dict(prune_allocation="global", logging_steps=1, save_strategy="steps", save_steps=5)
    trainer = MoEPruneTrainer(model=_qlora(), args=_args(tmp, **common), train_dataset=_dataset())
    watch = _Watch(trainer, 3)
    trainer.add_callback(watch)
    trainer.train()
    return trainer, watch, tmp, common


def test_qlora_run_removes_packed_experts_and_keeps_training(qlora_run):
    trainer, watch, _, _ = qlora_run
    moe = trainer.moe_model
    counts = moe.config.experts_per_layer
    assert sum(counts) == 12 and len(set(counts)) > 1, counts  # half of 24, non-uniform
    removal = [e for e in trainer.controller.events if e.action == "removed"]
    assert removal
    (dense_before, packed_before), (dense_after, packed_after) = watch.before, watch.after
    for layer, kept in enumerate(moe.config.kept_expert_ids):
        assert dense_after[layer].shape[0] == len(kept) == counts[layer]
        # the experts are frozen and packed: a kept expert is bit-identical to itself before the removal
        assert torch.equal(dense_after[layer], dense_before[layer][kept])
        for new, old in zip(packed_after[layer], packed_before[layer]):
            assert torch.equal(new, old.reshape(8, -1, *old.shape[1:])[kept].reshape(-1, *old.shape[1:]))
        assert _experts(trainer.model, layer).parametrizations.gate_up_proj.original0.dtype == torch.uint8
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    final = _lora(trainer.model)
    assert final and all(not torch.equal(watch.adapters[k], final[k]) for k in final), "adapters trained on"
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_qlora_save_reload_and_merge(qlora_run, tmp_path):
    trainer, _, _, _ = qlora_run
    out = tmp_path / "final"
    trainer.save_model(str(out))
    ids = torch.randint(0, 128, (2, 9))
    expected = _logits(trainer.model, ids)
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    assert base.config.experts_per_layer == trainer.moe_model.config.experts_per_layer
    assert "model.layers.1.mlp.experts.gate_up_proj" in quantized_targets(base)  # still packed on disk and back
    reloaded = PeftModel.from_pretrained(base, out)
    assert torch.equal(_logits(reloaded, ids), expected)
    # merged export (the documented step): the pruned base dequantized, the adapter folded in, a plain model
    merge_saved_lora(str(out), str(tmp_path / "merged"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not quantized_targets(plain) and not any("lora" in k for k in plain.state_dict())
    assert plain.config.experts_per_layer == trainer.moe_model.config.experts_per_layer
    torch.testing.assert_close(_logits(plain, ids), expected, rtol=1e-4, atol=1e-4)


def test_qlora_resume_after_removal_is_exact(qlora_run):
    trainer, _, tmp, common = qlora_run
    checkpoint = tmp / "run" / "checkpoint-5"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "base_model").is_dir()
    fresh = MoEPruneTrainer(model=_qlora(), args=_args(tmp, **common), train_dataset=_dataset())
    fresh.train(resume_from_checkpoint=str(checkpoint))
    expected, resumed = trainer.model.state_dict(), fresh.model.state_dict()
    assert expected.keys() == resumed.keys()
    for key in expected:  # packed codes, scales and adapters alike
        assert torch.equal(resumed[key], expected[key]), key
    assert fresh.moe_model.config.kept_expert_ids == trainer.moe_model.config.kept_expert_ids


def test_bitsandbytes_4bit_base_with_lora_prunes_saves_and_reloads(tmp_path):
    """The QLoRA setup most peft users start from: a bitsandbytes 4-bit base (BitsAndBytesConfig), LoRA on the
    attention. bitsandbytes packs the nn.Linear layers only: the fused 3D experts stay in full precision (and
    pruning them is what shrinks the base). Removal, training on, save and the peft reload must all work."""
    from transformers import BitsAndBytesConfig

    bnb = pytest.importorskip("bitsandbytes")
    folder = tmp_path / "base"
    # hidden 64: bitsandbytes' packed CPU kernel (taken on CPUs with AVX512-BF16, in eval) needs in_features >= its
    # block size (64); the default tiny width (32) crashes inside bitsandbytes there
    tiny_model("mixtral", hidden_size=64).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert base.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32  # bitsandbytes leaves them alone
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = MoEPruneTrainer(
        model=model, args=_args(tmp_path, prune_allocation="global", logging_steps=1), train_dataset=_dataset()
    )
    watch = _AdapterWatch(trainer, 3)
    trainer.add_callback(watch)
    trainer.train()
    counts = trainer.moe_model.config.experts_per_layer
    assert sum(counts) == 12, counts
    assert [_experts(model, i).gate_up_proj.shape[0] for i in range(3)] == counts
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    final = _lora(model)
    assert final and all(not torch.equal(watch.adapters[k], final[k]) for k in final), "adapters trained on"

    trainer.save_model(str(tmp_path / "final"))
    reloaded_base = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "base_model")
    # a uniform result (4 per layer here) is saved as the stock architecture, so check the modules' shapes
    assert [_experts(reloaded_base, i).gate_up_proj.shape[0] for i in range(3)] == counts
    assert isinstance(reloaded_base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    reloaded = PeftModel.from_pretrained(reloaded_base, tmp_path / "final")
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
