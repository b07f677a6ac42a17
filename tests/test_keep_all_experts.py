"""MoE layers that must keep all their experts (DeepSeek-V4's hash-routed layers, `MoEAdapter.keep_all_experts`):
every plan maker leaves them whole, surgery refuses plans that touch them, and the pruned model saves and reloads
them bit for bit."""

import json

import pytest
import torch
from train_args import counting_dataset, train_args
from transformers import AutoModelForCausalLM

import hf_moeprune
from hf_moeprune import KeepAllExperts, MoEAdapter, permute_experts, prune_experts
from hf_moeprune.adapters.base import check_keep_all_experts
from hf_moeprune.commands import main
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.oneshot import collect_statistics, plan_oneshot, prune_oneshot
from hf_moeprune.pruning.allocation import AllocationSpec, LayerBudget, allocate
from hf_moeprune.training import MoEPruneArguments, MoEPruneTrainer

HASH = 0  # the tiny DeepSeek-V4's mlp_layer_types: ["hash_moe", "moe", "moe", "moe"]
IDS = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(5))


def _hash_layer_state(model) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{HASH}.mlp."
    return {name: t.detach().clone() for name, t in model.state_dict().items() if name.startswith(prefix)}


def _assert_hash_layer_whole(model, before: dict[str, torch.Tensor]) -> None:
    after = _hash_layer_state(model)
    assert after.keys() == before.keys() and f"model.layers.{HASH}.mlp.gate.tid2eid" in after
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert model.config.experts_per_layer[HASH] == 8
    if hasattr(model.config, "kept_expert_ids"):
        assert model.config.kept_expert_ids[HASH] == list(range(8))


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 128, (4, 16), generator=g)} for _ in range(n)]


def test_the_declaration_names_the_hash_layers():
    model = tiny_model("deepseek_v4")
    adapter = hf_moeprune.get_adapter(model)
    assert adapter.keep_all_layers(model.config) == {HASH}
    assert adapter.moe_layer_indices(model) == [0, 1, 2, 3] and adapter.prunable_layer_indices(model) == [1, 2, 3]
    # random distinct expert ids per token (the stock init is all zeros)
    table = model.model.layers[HASH].mlp.gate.tid2eid
    assert (table[:, 0] != table[:, 1]).all() and len(table.unique()) == 8
    with pytest.raises(ValueError, match="must be a non-empty tuple"):
        KeepAllExperts("mlp_layer_types", (), "why")
    with pytest.raises(ValueError, match="needs a reason"):
        KeepAllExperts("mlp_layer_types", ("hash_moe",), "")
    with pytest.raises(ValueError, match="DeepseekV4Config does not declare"):
        check_keep_all_experts(
            MoEAdapter(model_type="deepseek_v4", keep_all_experts=KeepAllExperts("hash_layer_types", ("x",), "why"))
        )
    with pytest.raises(ValueError, match=r"some \(not all\) of them in \('dense',\)"):
        check_keep_all_experts(
            MoEAdapter(
                model_type="deepseek_v4",
                tiny_config=adapter.tiny_config,
                keep_all_experts=KeepAllExperts("mlp_layer_types", ("dense",), "why"),
            )
        )


@pytest.mark.parametrize(
    "plan",
    [{HASH: [0, 1, 2, 3, 4, 5], 1: [0, 1, 2, 3]}, {HASH: list(range(8))[::-1]}, {HASH: [0, 1]}, {HASH: [0.5, 1]}],
    ids=["removes", "reorders", "fewer-than-top-k", "not-indices"],
)
def test_a_plan_touching_a_hash_layer_raises_and_changes_nothing(plan):
    model = tiny_model("deepseek_v4")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer\(s\) \[0\].*layer 0 \(mlp_layer_types\[0\] is 'hash_moe'") as err:
        prune_experts(model, plan)
    assert "token id" in str(err.value) and "prunable MoE layers: [1, 2, 3]" in str(err.value)
    assert not hf_moeprune.is_pruned(model)
    assert all(torch.equal(model.state_dict()[name], t) for name, t in before.items())
    if len(plan[HASH]) == 8:
        with pytest.raises(ValueError, match="removes or reorders experts of MoE layer"):
            permute_experts(model, plan)


def test_listing_every_hash_expert_in_order_is_a_no_op():
    model = tiny_model("deepseek_v4")
    before = _hash_layer_state(model)
    prune_experts(model, {HASH: list(range(8)), 1: [7, 0, 3, 4], 2: [1, 2, 3, 4, 5, 6]})
    assert model.config.experts_per_layer == [8, 4, 6, 8]
    _assert_hash_layer_whole(model, before)


def test_non_uniform_layout_saves_in_the_pruned_format_and_reloads_bit_for_bit(tmp_path):
    model = tiny_model("deepseek_v4")
    before = _hash_layer_state(model)
    prune_experts(model, {layer: [5, 4, 3, 2, 1, 0] for layer in (1, 2, 3)})
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)  # export_stock=True: falls back to the pruned format (hash layers keep 8)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "moeprune_deepseek_v4" and config["experts_per_layer"] == [8, 6, 6, 6]
    assert config["n_routed_experts"] == 8 and config["mlp_layer_types"] == ["hash_moe", "moe", "moe", "moe"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_hash_layer_whole(reloaded, before)
    assert reloaded.model.layers[1].mlp.gate.weight.shape == (6, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, expected)


@pytest.mark.parametrize("allocation", ["uniform", "global", "laep"])
def test_one_shot_pruning_leaves_hash_layers_whole(allocation):
    model = tiny_model("deepseek_v4")
    before = _hash_layer_state(model)
    stats = collect_statistics(model, _batches(), progress=False)
    assert stats[HASH].tokens.sum() == 3 * 4 * 16 * 2  # statistics are still recorded there
    plan = prune_oneshot(model, _batches(), criterion="reap", target=0.25, allocation=allocation)
    assert HASH not in plan and plan
    _assert_hash_layer_whole(model, before)
    counts = model.config.experts_per_layer
    if allocation == "uniform":  # the others lose 8 of 24 (1/3 each, rounded): the whole target is spent there
        assert counts == [8, 5, 5, 5]
    else:
        assert sum(counts) == 32 - 8 and all(c >= 2 for c in counts)
    # a target the other layers cannot meet alone is capped by their floors, never taken from the hash layer
    model = tiny_model("deepseek_v4")
    plan = plan_oneshot(model, collect_statistics(model, _batches(), progress=False), "reap", 0.8, allocation)
    assert HASH not in plan and [len(plan[layer]) for layer in (1, 2, 3)] == [2, 2, 2]


@pytest.mark.parametrize("mode", ["uniform", "global", "laep"])
def test_allocation_spends_the_target_on_the_other_layers(mode):
    budgets = {0: LayerBudget(8, 8, 8, keep_all=True), 1: LayerBudget(8, 8, 2), 2: LayerBudget(8, 8, 2)}
    scores = {layer: torch.arange(8, dtype=torch.float64) + layer for layer in budgets}
    keep = allocate(budgets, 0.25, AllocationSpec(mode), scores, scores)
    assert keep[0] == 8 and keep[1] + keep[2] == 16 - 6
    with pytest.raises(ValueError, match="keep_all=True but current=6"):
        LayerBudget(8, 6, 2, keep_all=True)


def test_cli_keep_touching_a_hash_layer_fails_before_writing(tmp_path):
    tiny_model("deepseek_v4").save_pretrained(tmp_path / "model")
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tmp_path / "model"), "--output_dir", str(out), "--keep"]
    with pytest.raises(SystemExit, match=r"layer\(s\) \[0\].*'hash_moe'") as failed:
        main([*argv, '{"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}'])
    assert failed.value.code == 2 and not out.exists()
    assert main([*argv, '{"1": [0, 1, 2, 3], "3": [4, 5, 6]}']) == 0  # streamed, without loading the model
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.experts_per_layer == [8, 4, 8, 3]
    _assert_hash_layer_whole(reloaded, _hash_layer_state(AutoModelForCausalLM.from_pretrained(tmp_path / "model")))


def test_selection_bias_and_rebalancing_leave_hash_layers_alone():
    from hf_moeprune.balancing.loads import measure_expert_loads, rebalance_for_expert_parallel
    from hf_moeprune.format import enable_selection_bias

    model = tiny_model("deepseek_v4")
    adapter = hf_moeprune.get_adapter(model)
    with pytest.raises(ValueError, match=r"re-route MoE layers \[0\].*'hash_moe'"):
        enable_selection_bias(model, adapter)
    before = _hash_layer_state(model)
    loads = measure_expert_loads(model, _batches(), progress=False)
    assert set(loads) == {0, 1, 2, 3}
    plan = rebalance_for_expert_parallel(model, loads, ep_size=2)
    assert HASH not in plan.layer_ids
    _assert_hash_layer_whole(model, before)


def test_trainer_leaves_hash_layers_whole(tmp_path):
    model = tiny_model("deepseek_v4")
    before = _hash_layer_state(model)
    args = train_args(
        tmp_path / "run",
        max_steps=4,
        prune_target=0.25,
        prune_criterion="reap",
        prune_schedule="oneshot",
        prune_start_step=2,
        prune_end_step=3,
        router_bias_update_rate=1e-3,  # DeepSeek-V4's own e_score_correction_bias, in the top-k layers only
    )
    for parameter in model.model.layers[HASH].mlp.parameters():
        parameter.requires_grad_(False)  # so that "whole" means bit for bit after training
    trainer = MoEPruneTrainer(model=model, args=args, train_dataset=counting_dataset())
    assert trainer._budgets[HASH].keep_all and trainer._budgets[HASH].lowest == 8
    trainer.train()
    model = trainer.model.eval()
    counts = model.config.experts_per_layer
    assert counts[HASH] == 8 and sum(counts) == 32 - 8  # 25% of all routed experts, all from the top-k layers
    assert trainer.controller.events and all(e.layer != HASH for e in trainer.controller.events)
    _assert_hash_layer_whole(model, before)
    assert not torch.equal(model.model.layers[1].mlp.gate.e_score_correction_bias, torch.zeros(counts[1]))
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert reloaded.config.model_type == "moeprune_deepseek_v4"
    _assert_hash_layer_whole(reloaded, before)


def test_trainer_refuses_a_target_the_other_layers_cannot_meet(tmp_path):
    args = MoEPruneArguments(output_dir=str(tmp_path), prune_target=0.8, report_to=[], use_cpu=True)
    # 32 routed experts, 8 of them in the hash layer; the 3 others keep >= top-k 2 each: at most 18 can go
    with pytest.raises(ValueError, match=r"remove 26 of 32.*MoE layers \[0\] keep all their experts.*0\.562"):
        MoEPruneTrainer(model=tiny_model("deepseek_v4"), args=args)
