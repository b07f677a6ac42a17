"""Expert merging: frequency-weighted folding of removed experts into their most similar kept expert."""

import torch

from hf_moeprune import prune_experts
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.oneshot import ExpertOutputObserver, collect_statistics, plan_oneshot
from hf_moeprune.pruning.merging import merge_assignment, merge_experts, merged_rows


def test_merged_rows_are_the_frequency_weighted_average():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 5)
    merged = merged_rows(w, {1: 0, 3: 0}, torch.tensor([2.0, 1.0, 7.0, 1.0]))
    assert torch.allclose(merged[0], (2 * w[0] + w[1] + w[3]) / 4, atol=1e-6)
    assert torch.equal(merged[1:], w[1:]), "other rows untouched"
    # identical experts: bit-identical result, also in bf16
    b = torch.randn(3, 8).to(torch.bfloat16)
    b[2] = b[0]
    assert torch.equal(merged_rows(b, {2: 0}, torch.tensor([3.0, 1.0, 5.0]))[0], b[0])
    # a group that never saw a token keeps the kept expert as it is
    assert torch.equal(merged_rows(w, {1: 0}, torch.zeros(4))[0], w[0])


def test_assignment_follows_output_similarity():
    outputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 2.0]])
    assert merge_assignment(outputs, [0, 1]) == {2: 0, 3: 1}
    assert merge_assignment(outputs, [0, 1, 2, 3]) == {}


def _duplicate(model, layer, source, copy):
    with torch.no_grad():
        mlp = model.model.layers[layer].mlp
        mlp.gate.weight[copy] = mlp.gate.weight[source]
        for name in ("gate_up_proj", "down_proj"):
            getattr(mlp.experts, name)[copy] = getattr(mlp.experts, name)[source]


def test_merging_identical_experts_preserves_the_output_exactly():
    """Top-1 Mixtral with expert 5 a copy of expert 2 (weights and router row): merging 5 into 2 and removing it
    leaves every logit bit-identical (tokens tied between 2 and 5 now all take 2, with weight 1). In float64: in
    float32 the BLAS kernels round differently once expert 2 computes the tokens of both in one matmul (~1e-7)."""
    model = tiny_model("mixtral", num_experts_per_tok=1).double()
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    _duplicate(model, 1, source=2, copy=5)
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    observer = ExpertOutputObserver()
    stats = collect_statistics(model, [{"input_ids": ids}], progress=False, observers=[observer])
    assert stats[1].tokens[2] + stats[1].tokens[5] > 0, "the duplicated pair must receive tokens"
    keep = {1: [0, 1, 2, 3, 4, 6, 7]}
    assignment = merge_assignment(observer.values["output_sum"][1], keep[1])
    assert assignment == {5: 2}, "identical outputs are the most similar"
    merge_experts(model, {1: assignment}, {1: stats[1].tokens})
    prune_experts(model, keep)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_merging_changes_the_kept_expert_by_frequency():
    model = tiny_model("qwen3_moe")
    reference = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    observer = ExpertOutputObserver()
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    stats = collect_statistics(model, [{"input_ids": ids}], progress=False, observers=[observer])
    keep = plan_oneshot(model, stats, "reap", 0.5)
    assignments = {layer: merge_assignment(observer.values["output_sum"][layer], kept) for layer, kept in keep.items()}
    merge_experts(model, assignments, {layer: s.tokens for layer, s in stats.items()})
    freq = stats[0].tokens.double()
    for kept in keep[0]:
        members = [r for r, k in assignments[0].items() if k == kept]
        total = freq[kept] + freq[members].sum()
        if not members or total == 0:
            continue
        expected = sum(freq[i] * reference[i].double() for i in [kept, *members]) / total
        got = model.model.layers[0].mlp.experts.down_proj[kept].double()
        assert torch.allclose(got, expected, atol=1e-6)


def test_trainer_merges_at_its_removal_event(tmp_path, monkeypatch):
    """`prune_merge=True`: at the removal step the kept experts become the frequency-weighted average of their
    group (grouped by weight similarity), exactly as `merged_rows` computes it from the unmerged weights."""
    from datasets import Dataset
    from train_args import train_args

    import hf_moeprune.training.trainer as trainer_module
    from hf_moeprune.pruning.merging import weight_similarity
    from hf_moeprune.training import MoEPruneTrainer

    ids = (torch.randint(0, 100, (16, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(16)) % 128
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    seen = {}
    real = trainer_module.prune_experts

    def run(merge: bool):
        args = train_args(tmp_path / str(merge), max_steps=3, prune_target=0.5, prune_schedule="oneshot",
                          prune_start_step=3, prune_end_step=3, prune_report=False, prune_merge=merge)  # fmt: skip
        trainer = MoEPruneTrainer(model=tiny_model("mixtral"), args=args, train_dataset=data)

        def spy(model, plan, **kwargs):
            layer = model.model.layers[1].mlp.experts
            state = trainer.optimizer.optimizer.state[layer.down_proj]
            seen[merge] = {
                "plan": plan,
                "down": layer.down_proj.detach().clone(),
                "moments": {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")},
                "step": state["step"].clone(),
                "vectors": weight_similarity(model, 1),
                "tokens": trainer.controller.decision_stats[1].tokens.clone(),
            }
            return real(model, plan, **kwargs)

        monkeypatch.setattr(trainer_module, "prune_experts", spy)
        trainer.train()

    run(False)
    run(True)
    plain, merged = seen[False], seen[True]
    assert plain["plan"] == merged["plan"] and torch.equal(plain["tokens"], merged["tokens"])
    assignment = merge_assignment(plain["vectors"], plain["plan"][1])
    expected = merged_rows(plain["down"], assignment, plain["tokens"])
    kept = plain["plan"][1]
    assert torch.equal(merged["down"][kept], expected[kept])
    assert not torch.equal(merged["down"][kept], plain["down"][kept]), "merging changed the kept experts"
    # the AdamW moments of the kept experts are folded with the same weights (the step count is left alone)
    for name, moment in plain["moments"].items():
        folded = merged_rows(moment, assignment, plain["tokens"])
        assert torch.equal(merged["moments"][name][kept], folded[kept]), name
        assert not torch.equal(merged["moments"][name][kept], moment[kept]), name
    assert torch.equal(merged["step"], plain["step"])
