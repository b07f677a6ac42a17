import pytest
import torch

from hf_moeprune.oneshot import collect_statistics, plan_oneshot, prune_oneshot
from hf_moeprune.tiny_models import tiny_model


def _batches(n=4):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 128, (4, 16), generator=g)} for _ in range(n)]


def test_statistics_match_a_manual_count_and_leave_the_model_alone():
    model = tiny_model("mixtral")
    ids = torch.cat([b["input_ids"] for b in _batches()])
    with torch.no_grad():
        before = model(ids).logits
    stats = collect_statistics(model, _batches(), progress=False)
    for layer_stats in stats.values():
        assert layer_stats.tokens.sum().item() == 4 * 4 * 16 * 2
        assert (layer_stats.reap_sum[layer_stats.tokens == 0] == 0).all()
        assert (layer_stats.reap_sum[layer_stats.tokens > 0] > 0).all()
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before), "collecting statistics must not change the model"
    # hooks and the experts wrapper are gone
    assert not model.model.layers[0].mlp.gate._forward_hooks
    assert "forward" not in model.model.layers[0].mlp.experts.__dict__


@pytest.mark.parametrize("criterion", ["frequency", "reap", "saliency"])
def test_prune_oneshot_reaches_target_and_removes_lowest_scores(criterion):
    model = tiny_model("qwen3_moe")
    stats = collect_statistics(model, _batches(), saliency=criterion == "saliency", progress=False)
    plan = plan_oneshot(model, stats, criterion, 0.5)
    assert all(len(kept) == 4 for kept in plan.values())
    from hf_moeprune.pruning import get_criterion

    for layer, kept in plan.items():
        scores = get_criterion(criterion)(stats[layer])
        removed = [i for i in range(8) if i not in kept]
        assert scores[kept].min() >= scores[removed].max()
    applied = prune_oneshot(model, _batches(), criterion=criterion, target=0.5)
    assert model.config.experts_per_layer == [4, 4, 4] and applied


def test_random_scores_override():
    model = tiny_model("mixtral")
    stats = collect_statistics(model, _batches(1), progress=False)
    scores = {layer: torch.arange(8.0) for layer in stats}
    plan = plan_oneshot(model, stats, "frequency", 0.25, scores=scores)
    assert all(kept == [2, 3, 4, 5, 6, 7] for kept in plan.values())
