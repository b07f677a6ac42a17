import itertools
import json

import pytest
import torch

from hf_moeprune.balancing import PLACEMENT_METHODS, balancedness, device_loads, peak_lower_bound, plan_placement


def _optimal_balancedness(w: list[float], ep_size: int) -> float:
    """Exact: every split into ep_size equal-count groups (branch and bound on the peak)."""
    n, per = len(w), len(w) // ep_size
    best = [float("inf")]

    def search(rest, peak):
        if peak >= best[0]:
            return
        if not rest:
            best[0] = peak
            return
        first, others = rest[0], rest[1:]
        for group in itertools.combinations(others, per - 1):
            load = w[first] + sum(w[i] for i in group)
            search([i for i in others if i not in group], max(peak, load))

    search(list(range(n)), 0.0)
    return sum(w) / ep_size / best[0]


def _skewed(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "zipf":  # Zipf-like: the r-th most used expert gets load ~ 1 / r^s, ranks shuffled
        s = 0.6 + 0.9 * torch.rand((), generator=g, dtype=torch.float64)
        return 1000.0 / (torch.randperm(n, generator=g) + 1).double() ** s
    return torch.exp(1.5 * torch.randn(n, generator=g, dtype=torch.float64))  # lognormal


def _assert_permutation(order, n):
    assert sorted(order) == list(range(n))


@pytest.mark.parametrize("n,ep_size", [(8, 2), (8, 4), (12, 2), (12, 3), (12, 4)])
def test_full_planner_is_within_2_percent_of_the_exact_optimum(n, ep_size):
    ratios = []
    for seed in range(12):
        w = _skewed("zipf" if seed % 2 else "lognormal", n, seed)
        plan = plan_placement(w[None], ep_size)
        greedy = plan_placement(w[None], ep_size, method="greedy")
        optimum = _optimal_balancedness(w.tolist(), ep_size)
        after = plan.balancedness_after[0]
        _assert_permutation(plan.order[0], n)
        assert after >= 0.98 * optimum, (seed, w.tolist(), after, optimum)
        assert after <= optimum + 1e-12  # the brute force really is the optimum
        assert after >= plan.balancedness_before[0] - 1e-12
        assert after >= greedy.balancedness_after[0] - 1e-12
        assert plan.device_loads_after[0] == pytest.approx(device_loads(w, ep_size, plan.order[0]))
        ratios.append(after / optimum)
    assert sum(ratios) / len(ratios) >= 0.995


def test_full_planner_fixes_what_greedy_packing_leaves():
    # integer loads summing to 886 over 4 devices: no device can stay under 222, which the planner reaches
    w = torch.tensor([48.0, 52, 60, 87, 64, 39, 139, 75, 30, 20, 23, 22, 77, 48, 61, 41])
    greedy = plan_placement(w[None], 4, method="greedy")
    full = plan_placement(w[None], 4)
    assert greedy.balancedness_after[0] < 0.91
    assert max(full.device_loads_after[0]) == 222.0
    assert full.balancedness_after[0] == pytest.approx(221.5 / 222)
    assert [len(full.order[0][d * 4 : (d + 1) * 4]) for d in range(4)] == [4, 4, 4, 4]


def test_large_layers_reach_the_lower_bound():
    g = torch.Generator().manual_seed(0)
    loads = torch.exp(torch.randn(4, 64, generator=g, dtype=torch.float64))
    for ep_size in (2, 4, 8):
        plan = plan_placement(loads, ep_size)
        for layer in range(4):
            _assert_permutation(plan.order[layer], 64)
            bound = loads[layer].sum().item() / ep_size / peak_lower_bound(loads[layer], ep_size)
            assert plan.balancedness_after[layer] >= 0.99 * bound
            assert plan.balancedness_after[layer] > plan.balancedness_before[layer]


def test_one_expert_takes_all_the_load():
    w = torch.zeros(1, 8)
    w[0, 5] = 100.0
    plan = plan_placement(w, 4)
    assert plan.order == [list(range(8))]  # nothing to gain: nothing moves
    assert plan.balancedness_before == plan.balancedness_after == [0.25]
    rep = plan_placement(w, 4, num_redundant=4)
    # the hot expert gets one copy per device (no more: a fifth would share a device and move no load)
    assert rep.replica_count[0][5] == 4
    assert rep.balancedness_replicated == [1.0]
    phys = torch.tensor(rep.physical_to_logical[0]).view(4, 3)
    assert ((phys == 5).sum(dim=1) == 1).all()


def test_all_zero_loads():
    plan = plan_placement(torch.zeros(2, 8), 4, num_redundant=4)
    assert plan.order == [list(range(8))] * 2
    assert plan.balancedness_before == plan.balancedness_after == plan.balancedness_replicated == [1.0, 1.0]
    assert balancedness([0.0, 0.0]) == 1.0


def test_ep_size_one_and_ep_size_equal_to_expert_count():
    w = torch.tensor([[3.0, 1.0, 4.0, 1.0, 5.0, 9.0]])
    one = plan_placement(w, 1)
    assert one.order == [list(range(6))] and one.balancedness_after == [1.0]
    each = plan_placement(w, 6)
    assert each.order == [list(range(6))]
    assert each.balancedness_after[0] == pytest.approx((23 / 6) / 9)


def test_replica_maps_are_consistent_vllm_layout():
    loads = torch.stack([_skewed("zipf", 16, s) for s in range(3)])
    plain = plan_placement(loads, 4)
    plan = plan_placement(loads, 4, num_redundant=4)
    phys, l2p, count = plan.physical_to_logical_map, plan.logical_to_physical_map, plan.logical_replica_count
    assert phys.shape == (3, 20) and l2p.shape == (3, 16, 5) and count.shape == (3, 16)
    for layer in range(3):
        assert set(phys[layer].tolist()) == set(range(16))  # every logical expert has a slot
        assert torch.equal(torch.bincount(phys[layer], minlength=16), count[layer])
        assert count[layer].sum() == 20
        for e in range(16):
            slots = l2p[layer, e]
            valid = slots[slots >= 0]
            assert len(valid) == count[layer, e] and (slots[len(valid) :] == -1).all()
            assert (phys[layer, valid] == e).all()
        # a copy carries load / copies; each device holds 5 slots
        per_copy = loads[layer] / count[layer]
        dev = per_copy[phys[layer]].view(4, 5).sum(dim=1)
        assert dev.tolist() == pytest.approx(plan.device_loads_replicated[layer])
        assert plan.balancedness_replicated[layer] >= plain.balancedness_after[layer] - 1e-12
        assert plan.balancedness_replicated[layer] > 0.98
        # copies of one expert sit on different devices
        for row in phys[layer].view(4, 5):
            assert len(set(row.tolist())) == 5
    # the order part is the same plan as without replicas
    assert plan.order == plain.order
    # after permute_experts(model, order), new expert i is old expert order[i]: the maps follow
    moved = plan.for_permuted_checkpoint()
    assert all(o != list(range(16)) for o in plan.order)
    for layer in range(3):
        order = torch.tensor(plan.order[layer])
        assert torch.equal(order[moved.physical_to_logical_map[layer]], phys[layer])
        assert torch.equal(moved.logical_replica_count[layer], count[layer][order])
    assert moved.device_loads_replicated == plan.device_loads_replicated


def test_replicas_allow_an_expert_count_not_divisible_by_ep_size():
    w = torch.tensor([[6.0, 1, 1, 1, 1, 2]])
    with pytest.raises(ValueError, match=r"6 experts is not divisible by ep_size=4"):
        plan_placement(w, 4)
    plan = plan_placement(w, 4, num_redundant=2)
    assert plan.order == [None] and plan.balancedness_after == [None]
    assert sorted(set(plan.physical_to_logical[0])) == list(range(6)) and len(plan.physical_to_logical[0]) == 8
    assert plan.balancedness_replicated[0] == pytest.approx(3.0 / 3.0)  # copies of 6.0 split 3+3 next to 1+2


def test_layers_with_different_expert_counts():
    loads = {0: _skewed("zipf", 8, 0), 3: _skewed("lognormal", 6, 1)}
    plan = plan_placement(loads, 2, num_redundant=2)
    assert plan.layer_ids == [0, 3] and plan.num_experts == [8, 6]
    _assert_permutation(plan.order[0], 8)
    _assert_permutation(plan.order[1], 6)
    assert [len(p) for p in plan.physical_to_logical] == [10, 8]
    assert set(plan.orders_by_layer(skip_identity=False)) == {0, 3}
    with pytest.raises(ValueError, match=r"same expert count in every layer, got \[8, 6\]"):
        _ = plan.physical_to_logical_map
    as_list = plan_placement([loads[0], loads[3]], 2, num_redundant=2)
    assert as_list.order == plan.order and as_list.layer_ids == [0, 1]


@pytest.mark.parametrize("ep_size", [2, 8])
def test_group_limited_routing_keeps_whole_groups(ep_size):
    # 16 experts in 4 groups of 4: ep 2 puts 2 whole groups per device, ep 8 splits each group over 2 devices
    w = _skewed("zipf", 16, 3)
    plan = plan_placement(w[None], ep_size, num_groups=4)
    order = plan.order[0]
    _assert_permutation(order, 16)
    blocks = [order[g * 4 : (g + 1) * 4] for g in range(4)]
    assert sorted({e // 4 for e in block}.pop() for block in blocks) == [0, 1, 2, 3]
    assert all(len({e // 4 for e in block}) == 1 for block in blocks)
    assert plan.balancedness_after[0] >= plan.balancedness_before[0]
    with pytest.raises(ValueError, match=r"num_groups=4 .*ep_size=3"):
        plan_placement(torch.rand(1, 24), 3, num_groups=4)


def test_bad_input_errors_name_the_values():
    w = torch.rand(2, 8)
    with pytest.raises(ValueError, match=r"ep_size=0"):
        plan_placement(w, 0)
    with pytest.raises(ValueError, match=r"layer 0: 8 experts \+ num_redundant=3 = 11 .*ep_size=4"):
        plan_placement(w, 4, num_redundant=3)
    with pytest.raises(ValueError, match=r"num_redundant=-1"):
        plan_placement(w, 4, num_redundant=-1)
    bad = w.clone()
    bad[1, 2] = -1.0
    with pytest.raises(ValueError, match=r"layer 1: loads must be >= 0, got \[-1.0\] at experts \[2\]"):
        plan_placement(bad, 2)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1: loads must be finite"):
        plan_placement(bad, 2)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\); expected \[layers, experts\]"):
        plan_placement(torch.rand(2, 2, 2), 2)
    with pytest.raises(ValueError, match=r"shape \(8,\); expected \[layers, experts\]"):
        plan_placement(torch.rand(8), 2)
    with pytest.raises(ValueError, match=r"unknown placement method 'best'; known methods: \['full', 'greedy'\]"):
        plan_placement(w, 2, method="best")
    with pytest.raises(ValueError, match=r"needs replicas"):
        _ = plan_placement(w, 2).physical_to_logical_map
    assert sorted(PLACEMENT_METHODS) == ["full", "greedy"]
    with pytest.raises(ValueError, match=r"loads of type str"):
        plan_placement("0 1 2 3", 2)


def test_numpy_loads_plan_like_tensors():
    w = torch.rand(3, 8, generator=torch.Generator().manual_seed(0))
    assert plan_placement(w.numpy(), 4).order == plan_placement(w, 4).order


def test_plan_is_deterministic_and_json_serialisable():
    loads = torch.stack([_skewed("zipf", 32, s) for s in range(4)])
    a = plan_placement(loads, 4, num_redundant=4).to_dict()
    b = plan_placement(loads.clone(), 4, num_redundant=4).to_dict()
    assert a == b
    restored = json.loads(json.dumps(a))
    assert restored["order"] == a["order"] and restored["ep_size"] == 4
    summary = restored["summary"]
    assert summary["mean_balancedness_after"] > summary["mean_balancedness_before"]
    assert summary["min_balancedness_replicated"] >= summary["min_balancedness_after"] - 1e-12


def test_order_moves_few_experts():
    # one swap balances it; equal loads elsewhere must not be shuffled around
    w = torch.tensor([[9.0, 5, 5, 5, 1, 5, 5, 5]])
    plan = plan_placement(w, 4)
    assert plan.device_loads_before == [[14.0, 10.0, 6.0, 10.0]]
    assert plan.device_loads_after == [[10.0, 10.0, 10.0, 10.0]]
    assert plan.order == [[0, 4, 2, 3, 1, 5, 6, 7]]
    assert plan.orders_by_layer() == {0: [0, 4, 2, 3, 1, 5, 6, 7]}
    assert plan_placement(torch.full((1, 8), 5.0), 4).orders_by_layer() == {}


@pytest.mark.parametrize("ep_size", [2, 8])
def test_grouped_plan_is_accepted_by_permute_experts_and_keeps_logits(ep_size):
    from hf_moeprune import get_adapter, permute_experts
    from hf_moeprune.demo.tiny_models import tiny_model

    model = tiny_model("deepseek_v3", n_routed_experts=16, n_group=4, topk_group=2)
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    g = torch.Generator().manual_seed(1)
    loads = {layer: torch.rand(16, generator=g) ** 3 for layer in adapter.moe_layer_indices(model)}
    plan = plan_placement(loads, ep_size, num_groups=adapter.num_groups(model.config))
    orders = plan.orders_by_layer()
    assert orders, "these loads leave room to improve at least one layer"
    permute_experts(model, orders)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)
    for i, layer in enumerate(plan.layer_ids):
        assert plan.balancedness_after[i] >= plan.balancedness_before[i]
        assert model.config.kept_expert_ids[layer] == plan.order[i]
