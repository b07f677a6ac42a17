"""One routing observer (hf_moeprune.observation) behind the trainer, one-shot, balancing and the demo."""

import pytest
import torch
from datasets import Dataset

import hf_moeprune
from hf_moeprune.balancing.loads import measure_expert_loads
from hf_moeprune.demo.base_model import expert_histogram, measure_domains
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.observation import (
    RoutingInstrumentation,
    new_statistics,
    observe_routing,
    output_norm_sums,
    routed_counts,
)
from hf_moeprune.oneshot import collect_statistics


def test_routed_counts_and_norm_sums_by_hand():
    index = torch.tensor([[0, 2], [2, 1], [3, 2]])
    assert routed_counts(index, 5).tolist() == [1, 1, 3, 1, 0]
    # the middle token is padding: its two picks are not counted
    assert routed_counts(index, 5, torch.tensor([1.0, 0.0, 1.0])).tolist() == [1.0, 0.0, 2.0, 1.0, 0.0]
    gates = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.25, 0.75]])
    per_pair = torch.tensor(
        [[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [6.0, 8.0], [1.0, 0.0], [0.0, 0.0]]
    )  # norms 5,1,2,10,1,0
    reap, ean = output_norm_sums(index, gates, per_pair, 5)
    assert reap.tolist() == pytest.approx([2.5, 1.0, 0.5 + 1.8 + 0.0, 0.25, 0.0])
    assert ean.tolist() == pytest.approx([5.0, 10.0, 1.0 + 2.0 + 0.0, 1.0, 0.0])
    reap, ean = output_norm_sums(index, gates, per_pair, 5, torch.tensor([1.0, 0.0, 1.0]))
    assert reap.tolist() == pytest.approx([2.5, 0.0, 0.5, 0.25, 0.0])
    assert ean.tolist() == pytest.approx([5.0, 0.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "family, overrides", [("deepseek_v3", {"n_group": 2, "topk_group": 1}), ("glm4_moe", {})]
)  # fmt: skip
def test_every_caller_counts_what_the_biased_router_chose(family, overrides):
    """With a strong e_score_correction_bias (and group-limited routing), balancing loads, the demo's histograms,
    one-shot statistics and the trainer's observer all count the router's own choices, which plain top-k of the
    logits (what the demo counted before) does not reproduce."""
    model = tiny_model(family, **overrides)
    adapter = hf_moeprune.get_adapter(model)
    layers = adapter.decoder_layers(model)
    moe = adapter.moe_layer_indices(model)
    with torch.no_grad():
        for i in moe:
            bias = dict(
                adapter.moe_block(layers[i]).named_buffers(), **dict(adapter.moe_block(layers[i]).named_parameters())
            )
            bias = next(t for name, t in bias.items() if name.endswith("e_score_correction_bias"))
            bias.copy_(torch.linspace(1.0, -1.0, bias.numel()).roll(i))
    ids = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))

    # ground truth, independent of hf_moeprune.observation: the indices each router returned
    truth, topk_of_logits = {}, {}

    def hook(layer):
        def record(module, args, output):
            truth[layer] = routed_counts(output[2], output[0].shape[-1]).double()
            topk_of_logits[layer] = expert_histogram(output[0], model.config.num_experts_per_tok)

        return record

    handles = [adapter.router(layers[i]).register_forward_hook(hook(i)) for i in moe]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    assert any(not torch.equal(truth[i], topk_of_logits[i]) for i in moe)  # the bias changes the choice

    loads = measure_expert_loads(model, [{"input_ids": ids[:3]}, {"input_ids": ids[3:]}], progress=False)
    histograms = measure_domains(model, {"held_out": Dataset.from_dict({"input_ids": ids.tolist()})}, batch_size=4)
    oneshot = collect_statistics(model, [{"input_ids": ids}], progress=False)
    # the trainer's observer: training mode, recording around the forward, REAP wrapper on
    statistics = new_statistics(model, adapter)
    trainer_observer = RoutingInstrumentation(model, adapter, statistics)
    trainer_observer.attach()
    model.train()
    trainer_observer.recording = True
    with torch.no_grad():
        model(ids)
    trainer_observer.detach()
    model.eval()
    statistics.end_step()
    trained = statistics.snapshot()
    assert sorted(loads) == sorted(trained) == sorted(oneshot) == moe
    for row, i in enumerate(moe):
        assert torch.equal(loads[i], truth[i])
        assert torch.equal(histograms["held_out"]["histograms"][row], truth[i])
        assert torch.equal(oneshot[i].tokens, truth[i]) and torch.equal(oneshot[i].reap_tokens, truth[i])
        assert torch.equal(trained[i].tokens, truth[i])


def test_observe_routing_leaves_the_model_as_it_found_it():
    model = tiny_model("mixtral").train()
    forward = model.model.layers[0].mlp.experts.forward
    seen = []
    stats = observe_routing(
        model, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], on_output=lambda b, o: seen.append(o.logits.shape),
        progress=False,
    )  # fmt: skip
    assert model.training and model.model.layers[0].mlp.experts.forward == forward
    assert not model.model.layers[0].mlp.gate._forward_hooks
    assert seen == [torch.Size([1, 4, 128])] and stats.steps == 1
    assert all(s.tokens.sum() == 4 * model.config.num_experts_per_tok for s in stats.snapshot().values())
