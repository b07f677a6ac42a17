import pytest
import torch

from hf_moeprune.pruning import (
    AllocationSpec,
    ExpertStatistics,
    LayerBudget,
    LayerStats,
    ScheduleSpec,
    ScheduleState,
    allocate,
    get_criterion,
    get_schedule,
    rank_correlation,
    select_experts,
)


def _stats(tokens, reap_sum=None, saliency=None, prob=None):
    t = torch.tensor(tokens, dtype=torch.float64)
    return LayerStats(
        tokens=t,
        prob_mass=torch.tensor(prob, dtype=torch.float64) if prob else t / 10,
        reap_sum=torch.tensor(reap_sum, dtype=torch.float64) if reap_sum else t,
        saliency=torch.tensor(saliency, dtype=torch.float64) if saliency else t,
    )


# ---------------------------------------------------------------- statistics
def test_statistics_window_keeps_last_steps_only():
    s = ExpertStatistics({0: 3}, window=2)
    for step in range(4):
        s.add(0, "tokens", torch.tensor([1.0, step, 0.0]))
        s.end_step()
    snap = s.snapshot()[0]
    assert snap.tokens.tolist() == [2.0, 5.0, 0.0]  # steps 2 and 3


def test_statistics_decay_and_reduce():
    s = ExpertStatistics({0: 2, 3: 4}, decay=0.5)
    s.add(0, "tokens", torch.tensor([4.0, 0.0]))
    s.end_step()
    s.add(0, "tokens", torch.tensor([0.0, 2.0]))
    s.add(3, "saliency", torch.ones(4))
    s.end_step()
    assert s.snapshot()[0].tokens.tolist() == [2.0, 2.0]
    doubled = s.snapshot(reduce=lambda t: t * 2)
    assert doubled[0].tokens.tolist() == [4.0, 4.0] and doubled[3].saliency.tolist() == [2.0] * 4
    assert s.snapshot()[0].tokens.tolist() == [2.0, 2.0], "reduce must not change local state"


def test_statistics_follow_surgery_and_checkpoint():
    s = ExpertStatistics({1: 4}, window=3)
    s.add(1, "reap_sum", torch.tensor([1.0, 2.0, 3.0, 4.0]))
    s.end_step()
    s.select(1, torch.tensor([3, 0]))
    assert s.snapshot()[1].reap_sum.tolist() == [4.0, 1.0]
    clone = ExpertStatistics({1: 2})
    clone.load_state_dict(s.state_dict())
    s.add(1, "tokens", torch.tensor([1.0, 1.0]))
    clone.add(1, "tokens", torch.tensor([1.0, 1.0]))
    s.end_step()
    clone.end_step()
    assert torch.equal(s.snapshot()[1].tokens, clone.snapshot()[1].tokens) and clone.steps == 2
    with pytest.raises(ValueError, match=r"layer 1: tokens has shape \(3,\), expected \(2,\)"):
        s.add(1, "tokens", torch.ones(3))


# ---------------------------------------------------------------- criteria
def test_criteria_values():
    stats = _stats([10, 0, 4], reap_sum=[5.0, 0.0, 8.0], saliency=[0.1, 0.3, 0.2], prob=[3.0, 1.0, 2.0])
    assert get_criterion("frequency")(stats).tolist() == [10, 0, 4]
    assert get_criterion("prob_mass")(stats).tolist() == [3.0, 1.0, 2.0]
    assert get_criterion("reap")(stats).tolist() == [0.5, 0.0, 2.0]
    assert get_criterion("reap_frequency")(stats).tolist() == [5.0, 0.0, 8.0]
    assert get_criterion("saliency")(stats).tolist() == [0.1, 0.3, 0.2]
    with pytest.raises(ValueError, match="no ean_sum"):
        get_criterion("ean")(stats)
    ean = LayerStats(stats.tokens, stats.prob_mass, stats.reap_sum, stats.saliency, ean_sum=torch.tensor([7.0, 0, 9]))
    assert get_criterion("ean")(ean).tolist() == [7.0, 0.0, 9.0]
    with pytest.raises(ValueError, match=r"unknown prune_criterion 'nope'; known: \['ean', 'frequency'"):
        get_criterion("nope")


def test_rank_correlation():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(a, a * 10) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, torch.tensor([2.0, 1.0, 3.0, 4.0])) == pytest.approx(0.8)


# ---------------------------------------------------------------- schedules
def test_oneshot_and_gradual_and_stable():
    spec = ScheduleSpec(target=0.5, start_step=10, end_step=20, frequency=2)
    state = ScheduleState()
    oneshot, gradual, stable = get_schedule("oneshot"), get_schedule("gradual"), get_schedule("stable")
    assert [oneshot(s, spec, state) for s in (9, 10, 30)] == [0.0, 0.5, 0.5]
    values = [gradual(s, spec, state) for s in range(8, 23)]
    assert values[:3] == [0.0, 0.0, 0.0]  # steps 8, 9 and the start step 10 itself
    assert values[-3:] == [0.5, 0.5, 0.5]
    assert all(b >= a for a, b in zip(values, values[1:])), "gradual must be monotone"
    assert gradual(11, spec, state) == gradual(10, spec, state), "updates only every `frequency` steps"
    assert gradual(12, spec, state) == pytest.approx(0.5 * (1 - 0.8**3))
    assert stable(15, spec, state) == 0.0
    assert stable(20, spec, state) == 0.5, "deadline at end_step"
    assert stable(15, spec, ScheduleState(stable_since=14)) == 0.5
    with pytest.raises(ValueError, match="unknown prune_schedule 'linear'"):
        get_schedule("linear")


# ---------------------------------------------------------------- allocation
def _budgets(n_layers=4, experts=8, floor=2, multiple_of=1, groups=1):
    return {i: LayerBudget(experts, experts, floor, multiple_of, groups) for i in range(n_layers)}


def test_uniform_allocation():
    keep = allocate(_budgets(), 0.5, AllocationSpec("uniform"), {i: torch.ones(8) for i in range(4)})
    assert keep == {0: 4, 1: 4, 2: 4, 3: 4}


def test_floor_and_multiple_of_are_respected():
    budgets = _budgets(floor=3, multiple_of=2)
    scores = {i: torch.arange(8.0) + i for i in range(4)}
    for mode in ("uniform", "global", "laep"):
        keep = allocate(budgets, 0.75, AllocationSpec(mode), scores, scores)
        assert all(k % 2 == 0 and k >= 4 for k in keep.values()), (mode, keep)


def test_global_removes_more_from_concentrated_layers():
    concentrated = torch.tensor([100.0, 90.0, 1, 1, 1, 1, 1, 1])
    spread = torch.tensor([13.0, 12, 12, 12, 12, 12, 12, 11])
    scores = {0: concentrated, 1: spread}
    budgets = {0: LayerBudget(8, 8, 2), 1: LayerBudget(8, 8, 2)}
    keep = allocate(budgets, 0.5, AllocationSpec("global"), scores)
    assert sum(8 - k for k in keep.values()) == 8
    assert keep[0] < keep[1]
    assert keep[0] == 2


def test_laep_rule_candidates_and_beta():
    # layer 0: experts 4..7 are below the mean; their shares 0.01,0.02,0.03,0.04 -> cumulative .01 .03 .06 .10
    loads0 = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.01, 0.02, 0.03, 0.04])
    loads1 = torch.full((8,), 1.0)  # perfectly balanced: no candidate
    budgets = {0: LayerBudget(8, 8, 2), 1: LayerBudget(8, 8, 2)}
    spec = AllocationSpec("laep", laep_alpha=1.0, laep_beta=0.1)
    # a target of exactly what the rule allows: 4 experts from layer 0, none from the balanced layer
    keep = allocate(budgets, 4 / 16, spec, {0: loads0, 1: loads1}, {0: loads0, 1: loads1})
    assert keep == {0: 4, 1: 8}
    # smaller target: beta shrinks, still only the concentrated layer
    keep = allocate(budgets, 2 / 16, spec, {0: loads0, 1: loads1}, {0: loads0, 1: loads1})
    assert keep == {0: 6, 1: 8}


def test_laep_fills_with_global_when_rule_cannot_reach_target(caplog):
    loads = {0: torch.ones(8), 1: torch.ones(8)}
    scores = {0: torch.arange(8.0), 1: torch.arange(8.0) * 2}
    keep = allocate({0: LayerBudget(8, 8, 2), 1: LayerBudget(8, 8, 2)}, 0.5, AllocationSpec("laep"), scores, loads)
    assert sum(8 - k for k in keep.values()) == 8
    assert "LAEP" in caplog.text


def test_allocation_never_grows_and_counts_already_removed():
    budgets = {0: LayerBudget(8, 4, 2), 1: LayerBudget(8, 8, 2)}
    keep = allocate(budgets, 0.25, AllocationSpec("global"), {0: torch.ones(4), 1: torch.ones(8)})
    assert keep == {0: 4, 1: 8}  # 4 of 16 already removed = 25%
    keep = allocate(budgets, 0.5, AllocationSpec("global"), {0: torch.ones(4), 1: torch.arange(8.0)})
    assert keep[0] <= 4 and sum(budgets[i].current - keep[i] for i in keep) == 4


def test_select_experts_respects_groups():
    scores = torch.tensor([5.0, 1, 9, 2, 8, 7, 0, 3])
    assert select_experts(scores, 3) == [2, 4, 5]
    assert select_experts(scores, 4, groups=2) == [0, 2, 4, 5]
    assert select_experts(torch.zeros(4), 2) == [0, 1]
    with pytest.raises(ValueError, match="divide into 2 groups"):
        select_experts(scores, 3, groups=2)


def test_bad_specs():
    with pytest.raises(ValueError, match="allocation mode 'best'"):
        AllocationSpec("best")
    with pytest.raises(ValueError, match="laep_beta=1.5"):
        AllocationSpec("laep", laep_beta=1.5)
    with pytest.raises(ValueError, match="fraction=1.0"):
        allocate(_budgets(), 1.0, AllocationSpec(), {i: torch.ones(8) for i in range(4)})
