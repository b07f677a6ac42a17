import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_moeprune
from hf_moeprune.balancing.loads import measure_expert_loads, rebalance_for_expert_parallel
from hf_moeprune.balancing.placement import device_loads
from hf_moeprune.commands import main
from hf_moeprune.demo.tiny_models import tiny_model


def _batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # no pad token (id 0): its zero embedding gives all-equal router logits in models that start with linear
    # attention, and such ties may go to a different expert once experts are reordered (outputs do not change)
    return [{"input_ids": torch.randint(3, 128, (4, 16), generator=g)} for _ in range(n)]


def test_measured_loads_count_every_routed_token():
    model = tiny_model("qwen3_moe")
    loads = measure_expert_loads(model, _batches(), progress=False)
    assert sorted(loads) == [0, 1, 2]
    for load in loads.values():
        assert load.sum().item() == 6 * 4 * 16 * 2  # batches x batch x tokens x top-k
    masked = measure_expert_loads(
        model, [{"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.tensor([[1] * 8, [1] * 3 + [0] * 5])}],
        progress=False,
    )  # fmt: skip
    assert all(load.sum().item() == 11 * 2 for load in masked.values())


@pytest.mark.parametrize(
    "family", ["mixtral", "deepseek_v3", "gpt_oss", "granitemoe", "qwen3_next", "minimax", "deepseek_v2", "jamba"]
)
def test_rebalanced_model_keeps_outputs_and_balances_devices(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
    loads = measure_expert_loads(model, _batches(), progress=False)
    plan = rebalance_for_expert_parallel(model, loads, ep_size=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)
    # measured again, the new contiguous blocks carry the planned device loads
    new_loads = measure_expert_loads(model, _batches(), progress=False)
    for i, layer in enumerate(plan.layer_ids):
        assert device_loads(new_loads[layer], 4) == pytest.approx(plan.device_loads_after[i])
        assert plan.balancedness_after[i] >= plan.balancedness_before[i]


def test_balance_cli(workspace, capsys):
    out = workspace / "balanced"
    assert main(["balance", str(workspace / "model"), "--output_dir", str(out), "--data", str(workspace / "data.jsonl"),
                 "--text_field", "body", "--ep_size", "4", "--block_size", "16", "--num_redundant", "4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "replicas" in printed
    placement = json.loads((out / "placement.json").read_text())
    assert placement["ep_size"] == 4 and len(placement["physical_to_logical"][0]) == 12
    original = AutoModelForCausalLM.from_pretrained(workspace / "model")
    balanced = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(balanced(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
    assert hf_moeprune.get_adapter(balanced).model_type == "mixtral"
    with pytest.raises(SystemExit, match="not divisible by ep_size=3"):
        main(["balance", str(workspace / "model"), "--output_dir", str(workspace / "b3"), "--data",
              str(workspace / "data.jsonl"), "--text_field", "body", "--ep_size", "3", "--block_size", "16"])  # fmt: skip
    assert not (workspace / "b3").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe", "glm4_moe"])
def test_rank_expert_load_counts_what_the_experts_compute(family):
    """Without expert parallelism the kernel-level meter sees every routed pair: the router-level loads."""
    from hf_moeprune.balancing.expert_parallel import RankExpertLoad

    model = tiny_model(family)
    ids = torch.cat([b["input_ids"] for b in _batches()])
    loads = measure_expert_loads(model, [{"input_ids": ids}], progress=False)
    config = model.config
    implementation = config._experts_implementation
    with RankExpertLoad(model) as meter, torch.no_grad():
        out = model(ids).logits
    assert config._experts_implementation == implementation  # restored
    assert sorted(meter.counts) == sorted(loads)
    for layer, counts in meter.counts.items():
        assert torch.equal(counts.double(), loads[layer])
    assert meter.gather().tolist() == [[int(loads[layer].sum()) for layer in meter.layers]]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out)  # the meter only counts


def test_expert_parallel_checks_name_the_bad_values(monkeypatch):
    from hf_moeprune.balancing.expert_parallel import check_expert_parallel_counts, expert_parallel_config

    with pytest.raises(ValueError, match=r"layers \[0, 2\] have \[6, 3\] experts"):
        check_expert_parallel_counts([6, 8, 3, None], ep_size=4)
    check_expert_parallel_counts([8, None, 4], ep_size=4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="ep_size=3 must divide the number of processes"):
        expert_parallel_config(3)
    with pytest.raises(ValueError, match="ep_size=1"):
        expert_parallel_config(1)
    config = expert_parallel_config()
    assert (config.ep_size, config.fsdp_size) == (4, 4)


def test_load_expert_parallel_refuses_counts_that_do_not_divide(tmp_path, monkeypatch):
    from hf_moeprune.balancing.expert_parallel import load_expert_parallel

    monkeypatch.setenv("WORLD_SIZE", "4")
    tiny_model("mixtral", num_local_experts=6).save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match="ep_size=4 must divide the expert count, but .* has num_local_experts=6"):
        load_expert_parallel(str(tmp_path / "stock"))
    pruned = tiny_model("mixtral")
    hf_moeprune.prune_experts(pruned, {1: [0, 1, 2, 3, 4, 5]})
    pruned.save_pretrained(tmp_path / "pruned")
    with pytest.raises(ValueError, match=r"layers \[1\] have \[6\] experts"):
        load_expert_parallel(str(tmp_path / "pruned"))
