"""LoRA (peft) runs of MoEPruneTrainer: experts removed mid-training with their adapters, save/merge/resume."""

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from test_trainer import _args, _dataset
from transformers import AutoModelForCausalLM, TrainerCallback

import hf_moeprune
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.lora import merge_lora, merge_saved_lora
from hf_moeprune.surgery import unwrap_model
from hf_moeprune.training import MoEPruneTrainer
from hf_moeprune.training.optim import OptimizerStateSlicer

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _peft(target_parameters=EXPERT_TARGETS, seed=0, **kwargs):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=target_parameters,
                        init_lora_weights=False, **kwargs)  # fmt: skip
    return get_peft_model(tiny_model("mixtral"), config)


def _wrappers(model, layer):
    experts = unwrap_model(model).model.layers[layer].mlp.experts
    chain = []
    while hasattr(experts, "base_layer"):
        chain.append(experts)
        experts = experts.base_layer
    return chain


def test_removal_slices_fused_expert_lora_factors_and_their_optimizer_state():
    model = _peft()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    chain = _wrappers(model, 1)
    assert [w.parameter_name for w in chain] == ["down_proj", "gate_up_proj"]
    deltas = {w.parameter_name: w.get_delta_weight("default").detach().clone() for w in chain}
    moments = {w.parameter_name: optimizer.state[w.lora_B["default"].weight]["exp_avg"].clone() for w in chain}
    keep = [7, 0, 3]
    hf_moeprune.prune_experts(model, {1: keep}, on_tensor_replaced=OptimizerStateSlicer(optimizer))
    for w in chain:
        assert w.num_experts == 3
        assert w.lora_A["default"].weight.shape[0] == 3 * 4 and w.lora_B["default"].weight.shape[1] == 3 * 4
        # every kept expert's LoRA update is exactly the one it had: factors sliced, not reset or mixed
        assert torch.equal(w.get_delta_weight("default"), deltas[w.parameter_name][keep])
        b = w.lora_B["default"].weight
        cols = (torch.arange(4)[:, None] * 8 + torch.tensor(keep)[None, :]).reshape(-1)
        assert torch.equal(optimizer.state[b]["exp_avg"], moments[w.parameter_name][:, cols])
        assert any(p is b for g in optimizer.param_groups for p in g["params"])
    base = chain[-1].get_base_layer()
    assert base.gate_up_proj.shape[0] == 3 and base.num_experts == 3
    model(input_ids=ids, labels=ids).loss.backward()  # the forward and backward run on the new shapes
    optimizer.step()


class _AdapterWatch(TrainerCallback):
    """Copies of the experts' LoRA factors right after the removal step and at the end."""

    def __init__(self, trainer, step):
        self.trainer, self.step, self.after_removal = trainer, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.after_removal = _expert_lora(self.trainer.model)


def _expert_lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n and "lora_" in n}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    common = dict(prune_allocation="global", logging_steps=1, save_strategy="steps", save_steps=5)
    trainer = MoEPruneTrainer(model=_peft(), args=_args(tmp, **common), train_dataset=_dataset())
    watch = _AdapterWatch(trainer, 3)
    trainer.add_callback(watch)
    trainer.train()
    return tmp, common, trainer, watch


def test_lora_run_removes_experts_and_keeps_training_the_adapters(lora_run):
    tmp, _, trainer, watch = lora_run
    assert isinstance(trainer.model, PeftModel)
    counts = trainer.moe_model.config.experts_per_layer
    assert sum(counts) == 12 and len(set(counts)) > 1, counts  # non-uniform: the hardest layout
    for layer, count in enumerate(counts):
        for w in _wrappers(trainer.model, layer):
            assert w.num_experts == count
            assert w.lora_A["default"].weight.shape[0] == 4 * count
            assert w.lora_B["default"].weight.shape[1] == 4 * count
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    final = _expert_lora(trainer.model)
    assert watch.after_removal.keys() == final.keys()
    assert all(not torch.equal(watch.after_removal[k], final[k]) for k in final), "adapters trained after removal"
    # the base experts stayed frozen
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


def test_lora_save_reload_and_merge_give_the_same_logits(lora_run, tmp_path):
    _, _, trainer, _ = lora_run
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").is_file() and (out / "base_model" / "config.json").is_file()
    ids = torch.randint(0, 128, (2, 9))
    expected = _logits(trainer.model, ids)
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    assert base.config.experts_per_layer == trainer.moe_model.config.experts_per_layer
    reloaded = PeftModel.from_pretrained(base, out)
    assert torch.equal(_logits(reloaded, ids), expected)
    merge_saved_lora(str(out), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    plain_base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    assert not torch.allclose(_logits(plain_base, ids), expected, atol=1e-3)  # the adapter matters


def test_lora_resume_after_removal_is_exact(lora_run):
    tmp, common, trainer, _ = lora_run
    checkpoint = tmp / "run" / "checkpoint-5"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "moeprune_state.json").is_file()
    fresh = MoEPruneTrainer(model=_peft(), args=_args(tmp, **common), train_dataset=_dataset())
    fresh.train(resume_from_checkpoint=str(checkpoint))
    expected, resumed = trainer.model.state_dict(), fresh.model.state_dict()
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    assert fresh.moe_model.config.kept_expert_ids == trainer.moe_model.config.kept_expert_ids


def test_saliency_uses_expert_adapter_gradients_or_refuses(tmp_path):
    trainer = MoEPruneTrainer(model=_peft(), args=_args(tmp_path, prune_criterion="saliency", max_steps=3,
                                                        prune_start_step=2), train_dataset=_dataset())  # fmt: skip
    trainer.train()
    removed = [e for e in trainer.controller.events if e.action == "removed"]
    assert removed
    for event in removed:  # real scores, not zeros: the kept experts are not simply 0..k-1
        assert any(s > 0 for s in event.scores)
    assert any(ids != list(range(len(ids))) for ids in trainer.moe_model.config.kept_expert_ids)
    with pytest.raises(ValueError, match="prune_criterion='saliency' needs per-expert gradients"):
        MoEPruneTrainer(model=_peft(target_parameters=None), args=_args(tmp_path, prune_criterion="saliency"),
                        train_dataset=_dataset())  # fmt: skip


def test_add_adapter_model_trains_prunes_and_saves(tmp_path):
    # adapters inside the model itself, as transformers' add_adapter puts them (add_adapter calls peft's
    # inject_adapter_in_model and records peft_config; transformers 5.24 asks for peft >= 0.22 there, and 0.21 is
    # installed, so the same two steps are taken here directly)
    model = tiny_model("mixtral")
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_TARGETS,
                        init_lora_weights=False)  # fmt: skip
    inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}
    trainer = MoEPruneTrainer(model=model, args=_args(tmp_path, max_steps=5), train_dataset=_dataset())
    trainer.train()
    assert sum(model.config.experts_per_layer) == 12
    out = tmp_path / "final"
    trainer.save_model(str(out))
    ids = torch.randint(0, 128, (2, 9))
    expected = _logits(model, ids)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out)
    assert torch.equal(_logits(reloaded, ids), expected)
    merged = merge_lora(model)
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
