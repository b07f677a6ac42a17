import pytest
import torch

from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.oneshot import collect_statistics, plan_oneshot, prune_oneshot


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


def _padded_batches():
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 128, (3, 16), generator=g)} for _ in range(2)]
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, 11:] = 0  # right padding excluded from the statistics
    batches[1]["attention_mask"] = mask
    return batches


# mixtral: legacy per-expert keys; deepseek_v3: dense first layer, correction bias; qwen3_next: linear-attention
# layers with their own mask (gpt_oss's sliding windows and jamba's Mamba layers were checked the same way by hand)
# qwen3_moe with tied embeddings: the LM head is skipped only when it is not the input embedding
@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("mixtral", {}),
        ("deepseek_v3", {}),
        ("qwen3_next", {}),
        ("qwen3_moe", {"tie_word_embeddings": True}),
        ("llama4_text", {}),  # router output (scores, logits), dense experts on score-scaled inputs
    ],
)
def test_layerwise_statistics_equal_the_full_model(tmp_path, family, overrides):
    from transformers import AutoModelForCausalLM

    from hf_moeprune.oneshot import ExpertOutputObserver, MaxActivationObserver, collect_statistics_layerwise

    tiny_model(family, **overrides).save_pretrained(tmp_path, max_shard_size="60KB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    full_obs = [MaxActivationObserver(), ExpertOutputObserver()]
    full = collect_statistics(model, _padded_batches(), progress=False, observers=full_obs)
    layer_obs = [MaxActivationObserver(), ExpertOutputObserver()]
    skeleton, layerwise = collect_statistics_layerwise(tmp_path, _padded_batches(), progress=False, observers=layer_obs)
    assert sorted(layerwise) == sorted(full)
    for layer in full:
        for name in ("tokens", "prob_mass", "reap_sum", "ean_sum", "reap_tokens"):
            assert torch.equal(getattr(layerwise[layer], name), getattr(full[layer], name)), (layer, name)
        assert full[layer].tokens.sum() == (3 * 16 + 3 * 16 - 5) * 2  # padding not counted
    for a, b in zip(full_obs, layer_obs):
        for name, per_layer in a.values.items():
            for layer, value in per_layer.items():
                assert torch.equal(b.values[name][layer], value), (name, layer)
    for criterion in ("reap", "ean", "frequency"):
        assert plan_oneshot(skeleton, layerwise, criterion, 0.5, "global") == plan_oneshot(
            model, full, criterion, 0.5, "global"
        )
    # nothing was materialised for good: the skeleton's decoder layers are back on the meta device
    assert all(p.is_meta for p in skeleton.model.layers.parameters())


def test_calibration_runs_in_eval_mode_without_router_jitter():
    """Router jitter (and dropout) only act in train mode; calibration must not see them."""
    noisy = tiny_model("mixtral", router_jitter_noise=0.1).train()
    clean = tiny_model("mixtral")
    first = collect_statistics(noisy, _batches(2), progress=False)
    second = collect_statistics(noisy, _batches(2), progress=False)
    reference = collect_statistics(clean, _batches(2), progress=False)
    assert noisy.training, "the caller's mode is restored"
    for layer in reference:
        for name in ("tokens", "reap_sum", "ean_sum"):
            assert torch.equal(getattr(first[layer], name), getattr(reference[layer], name))
            assert torch.equal(getattr(second[layer], name), getattr(reference[layer], name))


def test_ean_criterion_and_super_expert_protection():
    from hf_moeprune.oneshot import MaxActivationObserver, super_experts
    from hf_moeprune.pruning import get_criterion

    model = tiny_model("qwen3_moe")
    with torch.no_grad():  # expert 3 of layer 1 emits one massive activation
        model.model.layers[1].mlp.experts.down_proj[3, 5, :] *= 400.0
    observer = MaxActivationObserver()
    stats = collect_statistics(model, _batches(), progress=False, observers=[observer])
    for layer_stats in stats.values():
        assert torch.equal(get_criterion("ean")(layer_stats), layer_stats.ean_sum)
        assert (layer_stats.ean_sum[layer_stats.tokens > 0] > layer_stats.reap_sum[layer_stats.tokens > 0]).all()
    protect = super_experts(observer.values["max_activation"])
    assert protect[1].nonzero().flatten().tolist() == [3]
    assert not protect[0].any() and not protect[2].any()
    scores = {layer: torch.tensor([8.0, 7.0, 6.0, 0.5, 5.0, 4.0, 3.0, 2.0]) for layer in stats}  # 3 would go
    assert 3 not in plan_oneshot(model, stats, "reap", 0.5, scores=scores)[1]
    assert 3 in plan_oneshot(model, stats, "reap", 0.5, scores=scores, protect=protect)[1]


def test_statistics_saved_once_serve_several_targets(tmp_path):
    from hf_moeprune.oneshot import MaxActivationObserver, load_statistics, save_statistics

    model = tiny_model("olmoe")
    observer = MaxActivationObserver()
    stats = collect_statistics(model, _batches(), progress=False, observers=[observer])
    save_statistics(tmp_path / "stats", stats, [observer], {"samples": 16})
    loaded, extra, meta = load_statistics(tmp_path / "stats")
    assert meta["samples"] == 16
    for layer in stats:
        for name in ("tokens", "prob_mass", "reap_sum", "ean_sum", "saliency"):
            assert torch.equal(getattr(loaded[layer], name), getattr(stats[layer], name))
        assert torch.equal(extra["max_activation"][layer], observer.values["max_activation"][layer])
    for target in (0.25, 0.5):
        assert plan_oneshot(model, loaded, "reap", target) == plan_oneshot(model, stats, "reap", target)
    with pytest.raises(FileNotFoundError, match="holds no expert_statistics"):
        load_statistics(tmp_path)
