import json
import math

import pytest
import torch
from conftest import FAMILIES
from datasets import Dataset
from train_args import train_args
from transformers import AutoModelForCausalLM

import hf_moeprune
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.training import MoEPruneTrainer
from hf_moeprune.training.optim import OptimizerStateSlicer


def _dataset(n=32, seq=16, seed=0):
    # a learnable pattern (next token = token + 1) so the loss moves within a few steps
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 100, (n, 1), generator=g)
    ids = (start + torch.arange(seq)) % 128
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(tmp_path, **overrides):
    base = dict(max_steps=8, logging_steps=4, prune_target=0.5, prune_schedule="oneshot", prune_start_step=3)
    return train_args(tmp_path / "run", **{**base, "prune_end_step": 6, **overrides})


def _train(tmp_path, family="mixtral", model=None, **overrides):
    model = model if model is not None else tiny_model(family)
    trainer = MoEPruneTrainer(model=model, args=_args(tmp_path, **overrides), train_dataset=_dataset())
    trainer.train()
    return trainer


@pytest.mark.parametrize("criterion", ["frequency", "prob_mass", "reap", "reap_frequency", "saliency"])
def test_each_criterion_prunes_to_target(tmp_path, criterion):
    trainer = _train(tmp_path, prune_criterion=criterion)
    counts = trainer.model.config.experts_per_layer
    assert sum(counts) == 12, counts  # 50% of 3 x 8
    assert all(c >= 2 for c in counts)
    events = [e for e in trainer.controller.events if e.action == "removed"]
    assert events and all(e.step == 3 for e in events)
    # the removed experts are the lowest-scored by the criterion at that step
    assert all(len(e.scores) == len(e.original_ids) for e in events)
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text())
    assert report["criterion"] == criterion
    assert (tmp_path / "run" / "expert_usage.png").stat().st_size > 1000


def test_statistics_are_meaningful(tmp_path):
    trainer = _train(tmp_path, prune_target=0.0, max_steps=3, prune_criterion="reap")
    stats = trainer.statistics.snapshot()
    # 4 sequences x 16 tokens x top-2 per step, decayed: tokens per layer sum to a known value
    expected = sum(128 * 0.98**k for k in range(3))
    for layer_stats in stats.values():
        assert layer_stats.tokens.sum().item() == pytest.approx(expected)
        assert layer_stats.prob_mass.sum().item() == pytest.approx(expected / 2, rel=1e-5)
        assert (layer_stats.reap_sum > 0).sum() == (layer_stats.tokens > 0).sum()
        assert torch.equal(layer_stats.reap_tokens, layer_stats.tokens)  # REAP recorded on every step


def test_reap_interval_records_reap_on_every_nth_step_only(tmp_path):
    trainer = _train(tmp_path, prune_target=0.0, max_steps=6, prune_criterion="reap", prune_reap_interval=3,
                     prune_stats_decay=1.0)  # fmt: skip
    from hf_moeprune.pruning.criteria import get_criterion

    for layer_stats in trainer.statistics.snapshot().values():
        assert layer_stats.tokens.sum().item() == 6 * 128  # router statistics: every step
        assert layer_stats.reap_tokens.sum().item() == 2 * 128  # REAP: steps 0 and 3
        routed = layer_stats.reap_tokens > 0
        assert bool((layer_stats.reap_sum[routed] > 0).all()) and not bool(layer_stats.reap_sum[~routed].any())
        # the mean per routed token uses the tokens of the recorded steps
        score = get_criterion("reap")(layer_stats)
        torch.testing.assert_close(score[routed], layer_stats.reap_sum[routed] / layer_stats.reap_tokens[routed])
    with pytest.raises(ValueError, match="prune_reap_interval=0 must be >= 1"):
        _args(tmp_path, prune_reap_interval=0)


def test_gradual_schedule_removes_progressively(tmp_path):
    trainer = _train(tmp_path, prune_schedule="gradual", prune_start_step=2, prune_end_step=6, max_steps=8)
    steps = sorted({e.step for e in trainer.controller.events})
    assert len(steps) >= 2 and steps[0] >= 3 and steps[-1] <= 6
    assert sum(trainer.model.config.experts_per_layer) == 12


def test_stable_schedule_waits_for_stable_ranking(tmp_path):
    trainer = _train(
        tmp_path, prune_schedule="stable", prune_stable_window=2, prune_stable_threshold=-1.0, prune_start_step=1,
        prune_end_step=7,
    )  # fmt: skip
    # threshold -1 is met at the second window (step 4): pruning happens there, before the deadline
    assert trainer.controller.schedule_state.stable_since == 4
    assert {e.step for e in trainer.controller.events} == {4}
    trainer = _train(
        tmp_path, prune_schedule="stable", prune_stable_window=2, prune_stable_threshold=1.0, prune_start_step=1,
        prune_end_step=7,
    )  # fmt: skip
    assert trainer.controller.schedule_state.stable_since is None
    assert {e.step for e in trainer.controller.events} == {7}, "deadline at prune_end_step"


def test_uniform_vs_layer_adaptive(tmp_path):
    uniform = _train(tmp_path, prune_layer_adaptive=False, prune_target=0.25)
    assert uniform.model.config.experts_per_layer == [6, 6, 6]
    adaptive = _train(tmp_path, prune_layer_adaptive=True, prune_allocation="global", prune_target=0.25)
    assert sum(adaptive.model.config.experts_per_layer) == 18


def test_multiple_of_is_respected(tmp_path):
    trainer = _train(tmp_path, prune_target=0.5, prune_multiple_of=4, prune_allocation="global")
    assert all(c % 4 == 0 for c in trainer.model.config.experts_per_layer)


def test_optimizer_state_is_sliced_not_reset():
    model = tiny_model("mixtral")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    experts = model.model.layers[1].mlp.experts
    before = {k: v.clone() for k, v in optimizer.state[experts.down_proj].items()}
    keep = [7, 0, 3]
    hf_moeprune.prune_experts(model, {1: keep}, on_tensor_replaced=OptimizerStateSlicer(optimizer))
    state = optimizer.state[experts.down_proj]
    assert torch.equal(state["exp_avg"], before["exp_avg"][keep])
    assert torch.equal(state["exp_avg_sq"], before["exp_avg_sq"][keep])
    assert torch.equal(state["step"], before["step"])
    group_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert any(p is experts.down_proj for p in group_params)
    assert len(group_params) == len(list(model.parameters()))
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # runs on the new shapes


def test_trainer_keeps_moments_of_kept_experts(tmp_path):
    captured = {}

    class Spy(OptimizerStateSlicer):
        def __call__(self, old, new, index):
            if self.optimizer is not None and old in self.optimizer.state:
                captured[id(new)] = (self.optimizer.state[old]["exp_avg"][index].clone(), index)
            super().__call__(old, new, index)

    import hf_moeprune.training.trainer as trainer_module

    original = trainer_module.OptimizerStateSlicer
    trainer_module.OptimizerStateSlicer = Spy
    try:
        model = tiny_model("mixtral")
        trainer = MoEPruneTrainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset())
        trainer.train()
    finally:
        trainer_module.OptimizerStateSlicer = original
    assert captured
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    param = trainer.model.model.layers[0].mlp.experts.gate_up_proj
    assert param.shape[0] < 8
    assert id(param) in captured and param in inner.state


def test_save_model_loads_with_from_pretrained(tmp_path):
    trainer = _train(tmp_path, prune_allocation="global")
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    ids = torch.randint(0, 128, (2, 9))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trainer.model(ids).logits)
    assert reloaded.config.experts_per_layer == trainer.model.config.experts_per_layer


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_after_pruning_matches_uninterrupted_run(tmp_path):
    common = dict(max_steps=8, save_strategy="steps", save_steps=5, prune_schedule="gradual",
                  prune_start_step=2, prune_end_step=6, prune_grace_steps=0)  # fmt: skip
    full = _train(tmp_path / "a", **common)
    expected = _state(full.model)
    checkpoint = tmp_path / "a" / "run" / "checkpoint-5"
    assert (checkpoint / "moeprune_state.json").exists() and (checkpoint / "moeprune_state.safetensors").exists()
    assert not (checkpoint / "moeprune_state.pt").exists(), "no pickle in checkpoints"
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["model_type"] == "moeprune_mixtral", "checkpoints keep the pruned format"
    assert sum(saved["experts_per_layer"]) < 24

    fresh = MoEPruneTrainer(model=tiny_model("mixtral"), args=_args(tmp_path / "a", **common), train_dataset=_dataset())
    fresh.train(resume_from_checkpoint=str(checkpoint))
    resumed = _state(fresh.model)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    assert fresh.model.config.kept_expert_ids == full.model.config.kept_expert_ids
    assert [e.step for e in fresh.controller.events] == [e.step for e in full.controller.events]


def test_soft_masked_experts_are_never_selected_during_grace(tmp_path):
    model = tiny_model("mixtral")
    trainer = MoEPruneTrainer(
        model=model,
        args=_args(tmp_path, prune_grace_steps=3, prune_start_step=2, max_steps=7, prune_target=0.25),
        train_dataset=_dataset(),
    )
    chosen = {layer: [] for layer in range(3)}

    def spy(layer):
        def hook(module, args, output):  # registered after the trainer's hook: sees the re-routed output
            if trainer.controller is not None and trainer.controller.grace is not None:
                chosen[layer].append(output[2].flatten().tolist())
            return None

        return hook

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(spy(i))
    trainer.train()
    events = trainer.controller.events
    masked = [e for e in events if e.action == "masked"]
    assert masked and {e.step for e in masked} == {2}
    outcome = {e.action for e in events if e.step == 5}
    assert outcome in ({"removed"}, {"restored"}), events
    for event in masked:
        seen = {i for batch in chosen[event.layer] for i in batch}
        assert seen and not seen & set(event.original_ids), (event, seen)
    expected_total = 18 if outcome == {"removed"} else 24
    assert sum(trainer.model.config.experts_per_layer) == expected_total


def test_selective_expansion_rule(tmp_path):
    from hf_moeprune.pruning import AllocationSpec, ExpertStatistics, LayerBudget, ScheduleSpec
    from hf_moeprune.training.controller import PruningController

    def controller():
        stats = ExpertStatistics({0: 4})
        c = PruningController(
            budgets={0: LayerBudget(4, 4, 2)}, original_ids={0: [0, 1, 2, 3]}, statistics=stats,
            criterion="frequency", schedule="oneshot", schedule_spec=ScheduleSpec(0.5, 2, 2),
            allocation=AllocationSpec("uniform"), grace_steps=2, grace_tolerance=0.1,
        )  # fmt: skip
        return c, stats

    def run(losses):
        c, stats = controller()
        decisions = []
        for step, loss in enumerate(losses, start=1):
            stats.add(0, "tokens", torch.tensor([5.0, 1.0, 4.0, 2.0]))
            decisions.append(c.step(step, loss, stats.snapshot))
        return c, decisions

    # baseline = mean loss of the 2 steps before masking (1.0, 1.0); grace losses 1.05, 1.08 -> within 10%
    c, d = run([1.0, 1.0, 1.05, 1.08])
    assert d[1].mask == {0: [1, 3]} and d[3].remove == {0: [0, 2]} and d[3].unmask == {0: [1, 3]}
    assert c.budgets[0].current == 2
    # grace losses 1.2, 1.3 -> more than 10% above: restore and protect experts 1 and 3
    c, d = run([1.0, 1.0, 1.2, 1.3, 1.0])
    assert d[3].unmask == {0: [1, 3]} and not d[3].remove
    assert c.protected[0] == {1, 3}
    assert c.budgets[0].current == 4
    # next decision cannot pick the protected experts again: with only 0 and 2 left, nothing can go
    assert not d[4].remove and not d[4].mask or all(1 not in v and 3 not in v for v in d[4].mask.values())


def test_bf16_gradient_checkpointing_and_accumulation(tmp_path):
    trainer = _train(tmp_path, bf16=True, gradient_checkpointing=True, gradient_accumulation_steps=2, max_steps=5,
                     prune_start_step=2)  # fmt: skip
    assert sum(trainer.model.config.experts_per_layer) == 12
    # statistics were recorded once per micro-batch forward (not again during checkpoint recomputation):
    # 2 micro-batches x 4 sequences x 16 tokens x top-2 per optimizer step
    assert trainer.state.global_step == 5


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mixtral"])  # mixtral: the other tests
def test_other_families_train_and_prune(tmp_path, family):
    trainer = _train(tmp_path, family=family, max_steps=5, prune_start_step=2)
    counts = [c for c in trainer.model.config.experts_per_layer if c is not None]
    assert sum(counts) == 4 * len(counts)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    adapter = hf_moeprune.get_adapter(reloaded)
    layers = adapter.decoder_layers(reloaded)
    assert [adapter.num_experts(layers[i]) for i in adapter.moe_layer_indices(reloaded)] == counts
    if len(set(counts)) == 1:  # uniform: exported as the stock architecture
        assert reloaded.config.model_type == family
        assert reloaded.config.moeprune_provenance["experts_per_layer"] == trainer.model.config.experts_per_layer
    else:
        assert reloaded.config.experts_per_layer == trainer.model.config.experts_per_layer


def test_deepseek_group_limited_pruning_keeps_groups(tmp_path):
    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    trainer = _train(tmp_path, model=model, max_steps=4, prune_start_step=2, prune_allocation="global")
    for ids in trainer.model.config.kept_expert_ids:
        if ids is None:
            continue
        assert len(ids) % 2 == 0
        half = len(ids) // 2
        assert all(i < 4 for i in ids[:half]) and all(i >= 4 for i in ids[half:]), ids


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prune_target": 0.9}, r"prune_target=0.9 asks to remove 22 of 24"),
        ({"prune_criterion": "magic"}, r"unknown prune_criterion 'magic'"),
        ({"prune_schedule": "soon"}, r"unknown prune_schedule 'soon'"),
        ({"prune_target": 1.5}, r"prune_target=1.5 must be in \[0, 1\)"),
        ({"prune_start_step": 6, "prune_end_step": 2}, "prune_end_step=2 is before prune_start_step=6"),
        ({"prune_allocation": "uniform"}, "prune_allocation='uniform'"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        MoEPruneTrainer(model=tiny_model("mixtral"), args=_args(tmp_path, **overrides), train_dataset=_dataset())


def test_model_without_moe_layers_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=128))  # fmt: skip
    with pytest.raises(ValueError, match="model_type 'llama' is not a supported MoE family"):
        MoEPruneTrainer(model=dense, args=_args(tmp_path), train_dataset=_dataset())
    qwen_dense = tiny_model("qwen2_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(ValueError, match="has no MoE layers"):
        MoEPruneTrainer(model=qwen_dense, args=_args(tmp_path), train_dataset=_dataset())


def test_aux_loss_is_applied_and_bias_balancing_evens_loads(tmp_path):
    model = tiny_model("mixtral")
    with torch.no_grad():  # a router that sends almost everything to expert 0
        for layer in model.model.layers:
            layer.mlp.gate.weight[0] += 2.0 * torch.sign(layer.mlp.gate.weight[0]).abs()
    trainer = MoEPruneTrainer(
        model=model,
        args=_args(
            tmp_path, prune_target=0.0, router_bias_update_rate=0.05, learning_rate=0.0, max_steps=10, logging_steps=1
        ),  # fmt: skip
        train_dataset=_dataset(),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "moe/maxvio/mean" in h]
    assert logs[-1]["moe/maxvio/mean"] < logs[0]["moe/maxvio/mean"]
    biases = [layer.mlp.gate.selection_bias.clone() for layer in trainer.model.model.layers]
    assert all(b[0] < 0 for b in biases)  # the overloaded expert was pushed down in every layer
    # the learned bias is part of the saved model: it reloads and routes exactly as in training
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        expected = trainer.model(ids).logits
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for layer, bias in zip(reloaded.model.layers, biases):
        assert torch.equal(layer.mlp.gate.selection_bias, bias)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
        for layer in reloaded.model.layers:
            layer.mlp.gate.selection_bias.zero_()
        assert not torch.allclose(reloaded(ids).logits, expected)


def test_rearranges_experts_for_expert_parallel_after_pruning(tmp_path):
    trainer = _train(tmp_path, prune_target=0.5, balance_ep_size=2, max_steps=5, prune_start_step=2,
                     prune_allocation="global", logging_steps=1)  # fmt: skip
    counts = trainer.model.config.experts_per_layer
    assert all(c % 2 == 0 for c in counts) and sum(counts) == 12
    logs = [h for h in trainer.state.log_history if "moe/balancedness_after" in h]
    assert logs and logs[0]["moe/balancedness_after"] >= logs[0]["moe/balancedness_before"]
    # the controller followed the permutation: its original ids agree with the model's config
    for layer, ids in trainer.controller.original_ids.items():
        assert trainer.model.config.kept_expert_ids[layer] == ids


def test_loss_curve_is_logged_like_plain_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    common = dict(max_steps=8, per_device_train_batch_size=4, learning_rate=2e-3, report_to=[], save_strategy="no",
                  logging_steps=2, use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)  # fmt: skip
    plain = Trainer(model=tiny_model("mixtral"), args=TrainingArguments(str(tmp_path / "plain"), **common),
                    train_dataset=_dataset())  # fmt: skip
    plain.train()
    expected = [h for h in plain.state.log_history if "loss" in h]
    assert [h["step"] for h in expected] == [2, 4, 6, 8]
    # no pruning and no aux loss: the same numbers as plain Trainer
    same = _train(tmp_path / "same", prune_target=0.0, router_aux_loss_coef=0.0, prune_criterion="frequency",
                  logging_steps=2)  # fmt: skip
    logged = [h for h in same.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6, 8]
    for got, want in zip(logged, expected):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (key, got, want)
    # with pruning at step 3 and balance logs every step: the loss curve is still complete, events next to it
    pruned = _train(tmp_path / "pruned", logging_steps=1, router_bias_update_rate=1e-3)
    history = pruned.state.log_history
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 9))
    assert all(math.isfinite(h["loss"]) and "grad_norm" in h and "learning_rate" in h for h in history if "loss" in h)
    events = [h for h in history if "prune/experts/total" in h]
    assert [(h["step"], h["prune/experts/total"]) for h in events] == [(3, 12.0)]
    assert len([h for h in history if "moe/maxvio/mean" in h]) == 8
