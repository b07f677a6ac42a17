import pytest
import torch
from conftest import FAMILIES, RoutingRecorder

import hf_moeprune
from hf_moeprune import permute_experts, prune_experts
from hf_moeprune.demo.tiny_models import tiny_config, tiny_model

# One short sequence: 4 tokens x top-2 select at most 8 (expert, token) pairs, so most layers have
# experts no token selects.
INPUT = torch.tensor([[5, 17, 42, 99]])


def _route(model, ids=INPUT):
    rec = RoutingRecorder(model)
    with torch.no_grad():
        logits = model(ids).logits
    rec.close()
    return logits, rec.calls


def _unused_keep(model, calls, extra_relevant=None):
    """Per MoE layer: the experts any token selected (plus `extra_relevant`), in original order."""
    adapter = hf_moeprune.get_adapter(model)
    keep = {}
    for layer, (_, _, indices) in calls.items():
        used = set(indices.flatten().tolist())
        if extra_relevant is not None:
            used |= extra_relevant(layer)
        n = adapter.num_experts(adapter.decoder_layers(model)[layer])
        if len(used) < n:
            keep[layer] = sorted(used)
    return keep


def _unnormalised(family):
    """Overrides that switch renormalisation off where the family's config has a switch for it."""
    return {"norm_topk_prob": False} if hasattr(tiny_config(family), "norm_topk_prob") else {}


# Families whose tiny model's logits do not change when unselected experts go ...
INVARIANT_FAMILIES = [f for f in FAMILIES if hf_moeprune.ADAPTERS[f].output_invariant_under_removal(tiny_config(f))]
# ... and softmax families whose combine weights (at least without renormalisation) are the probabilities over
# all experts, so removing experts divides them by the kept probability mass.
RESCALING_FAMILIES = [
    f
    for f in FAMILIES
    if hf_moeprune.ADAPTERS[f].score_function == "softmax"
    and not hf_moeprune.ADAPTERS[f].renormalizes(tiny_config(f, **_unnormalised(f)))
]


def test_every_family_is_supported():
    assert set(FAMILIES) <= set(hf_moeprune.ADAPTERS)


def test_every_family_has_a_removal_test():
    assert set(FAMILIES) - set(INVARIANT_FAMILIES) <= set(RESCALING_FAMILIES)


@pytest.mark.parametrize("family", INVARIANT_FAMILIES)
def test_removing_unselected_experts_keeps_logits(family):
    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    assert adapter.output_invariant_under_removal(model.config), family
    before, calls = _route(model)
    keep = _unused_keep(model, calls)
    assert keep, "the test batch should leave some experts unused"
    counts_before = {layer: adapter.num_experts(adapter.decoder_layers(model)[layer]) for layer in keep}
    prune_experts(model, keep)
    after, calls_after = _route(model)
    for layer, kept in keep.items():
        assert adapter.num_experts(adapter.decoder_layers(model)[layer]) == len(kept) < counts_before[layer]
        # same experts chosen (mapped back to original ids) with the same weights
        _, w_before, i_before = calls[layer]
        _, w_after, i_after = calls_after[layer]
        mapped = torch.tensor(kept)[i_after]
        order_b, order_a = i_before.sort(-1), mapped.sort(-1)
        assert torch.equal(order_b.values, order_a.values)
        torch.testing.assert_close(w_before.gather(-1, order_b.indices), w_after.gather(-1, order_a.indices))
    # Renormalising routers give the same logits up to float rounding of the softmax denominator.
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert model.config.experts_per_layer == [
        len(keep[i]) if i in keep else counts_before.get(i, c) for i, c in enumerate(model.config.experts_per_layer)
    ]


@pytest.mark.parametrize("family", RESCALING_FAMILIES)
def test_unnormalised_softmax_families_rescale_weights_by_kept_mass(family):
    """Without renormalisation (Qwen/OLMoE without norm_topk_prob, Jamba, DeepSeek-V2) the weights are
    softmax probabilities over all experts (DeepSeek-V2: times routed_scaling_factor): removing experts
    changes the denominator. What still holds: the same experts win, and each weight is divided by the
    probability mass the kept experts had."""
    model = tiny_model(family, **_unnormalised(family))
    adapter = hf_moeprune.get_adapter(model)
    assert not adapter.output_invariant_under_removal(model.config)
    before, calls = _route(model)
    keep = _unused_keep(model, calls)
    prune_experts(model, keep)
    after, calls_after = _route(model)
    layer = min(keep)  # the first pruned layer sees the same input, so its routing is comparable
    logits_b, w_b, i_b = calls[layer]
    _, w_a, i_a = calls_after[layer]
    kept = torch.tensor(keep[layer])
    # compared in original-id order: DeepSeek-V2's unsorted top-k may list the winners in another order
    order_b, order_a = i_b.sort(-1), kept[i_a].sort(-1)
    assert torch.equal(order_a.values, order_b.values)
    kept_mass = torch.softmax(logits_b.float(), -1)[:, kept].sum(-1, keepdim=True)
    torch.testing.assert_close(w_a.gather(-1, order_a.indices), w_b.gather(-1, order_b.indices) / kept_mass)
    assert not torch.allclose(after, before, atol=1e-6), "logits should change when the denominator changes"


def test_deepseek_group_limited_routing_keeps_logits_when_group_scores_survive():
    """With n_group > 1 a group's score is the sum of its top-2 experts. Removing experts that are
    neither selected nor among any group's top-2 leaves the logits unchanged."""
    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    adapter = hf_moeprune.get_adapter(model)
    assert not adapter.output_invariant_under_removal(model.config)
    ids = torch.tensor([[7]])
    before, calls = _route(model, ids)
    layers = adapter.decoder_layers(model)

    def group_top2(layer):
        logits, _, _ = calls[layer]
        gate = adapter.router(layers[layer])
        scores = torch.sigmoid(logits.float()) + gate.e_score_correction_bias
        top2 = scores.view(-1, 2, 4).topk(2, dim=-1).indices + torch.tensor([0, 4]).view(1, 2, 1)
        return set(top2.flatten().tolist())

    keep = _unused_keep(model, calls, group_top2)
    assert keep and all(len(k) == 4 for k in keep.values())
    prune_experts(model, keep)
    after, _ = _route(model, ids)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_prune_removes_every_per_expert_tensor(family):
    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    layer = adapter.moe_layer_indices(model)[-1]
    block = adapter.moe_block(adapter.decoder_layers(model)[layer])
    keep = [6, 1, 3]
    originals = {name: t.detach().clone() for name, t in block.state_dict().items() if t.dim() and t.shape[0] == 8}
    n_before = sum(p.numel() for p in model.parameters())
    prune_experts(model, {layer: keep})
    state = block.state_dict()
    assert originals, "expected per-expert tensors"
    for name, tensor in originals.items():
        assert state[name].shape[0] == 3, name
        assert torch.equal(state[name], tensor[keep]), name
    assert sum(p.numel() for p in model.parameters()) < n_before
    for attr in ("num_experts",):  # Gemma-4's router keeps no count (it reads its config)
        assert getattr(adapter.router(adapter.decoder_layers(model)[layer]), attr, 3) == 3
        assert getattr(adapter.experts(adapter.decoder_layers(model)[layer]), attr) == 3
    assert model.config.kept_expert_ids[layer] == keep
    assert model.config.experts_per_layer[layer] == 3
    assert model.config.original_num_experts == 8
    # Gradients still flow through the new parameters.
    model.train()
    model(INPUT, labels=INPUT).loss.backward()
    assert adapter.experts(adapter.decoder_layers(model)[layer]).down_proj.grad is not None


def test_pruning_twice_tracks_original_ids():
    model = tiny_model("mixtral")
    prune_experts(model, {1: [7, 5, 3, 1, 0]})
    prune_experts(model, {1: [0, 2, 4]})
    assert model.config.kept_expert_ids[1] == [7, 3, 0]
    assert model.config.experts_per_layer == [8, 3, 8]


def test_permute_keeps_outputs(family):
    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    groups = adapter.num_groups(model.config)
    order = {}
    for layer in adapter.moe_layer_indices(model):
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(layer)).tolist()
        if groups > 1:
            perm = sorted(perm, key=lambda e: e // (8 // groups))
        order[layer] = perm
    permute_experts(model, order)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    for layer, perm in order.items():
        assert model.config.kept_expert_ids[layer] == perm


def test_permute_deepseek_groups_move_whole():
    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    permute_experts(model, {1: [5, 4, 7, 6, 1, 0, 3, 2]})
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="old groups"):
        permute_experts(model, {1: [0, 4, 1, 5, 2, 6, 3, 7]})


@pytest.mark.parametrize(
    "keep, message",
    [
        ({1: [3]}, "fewer than top-k=2"),
        ({1: [0, 8]}, r"\[8\] out of range \[0, 8\)"),
        ({1: [0, -1]}, r"\[-1\] out of range"),
        ({1: [2, 2, 3]}, r"\[2\] repeated"),
        ({7: [0, 1]}, r"layer\(s\) \[7\] are not MoE layers"),
        ({1: ["a", 1]}, "integer expert indices"),
    ],
)
def test_prune_rejects_bad_input(keep, message):
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match=message):
        prune_experts(model, keep)
    assert model.config.model_type == "mixtral", "a failed call must not change the model"


def test_deepseek_dense_layers_are_not_moe_layers():
    model = tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match=r"layer\(s\) \[0\] are not MoE layers.*MoE layers: \[1, 2\]"):
        prune_experts(model, {0: [0, 1]})


@pytest.mark.parametrize(
    "keep, message",
    [
        ({1: [0, 1, 4]}, "multiple of 2"),
        ({1: [0, 4, 1, 5]}, "from old groups"),
        ({1: [0, 4]}, "too few"),
        ({1: [0, 1, 2, 3]}, "appear twice|from old groups"),
    ],
)
def test_deepseek_group_structure_errors(keep, message):
    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    with pytest.raises(ValueError, match=message):
        prune_experts(model, keep)


def test_deepseek_v2_groups_count_only_when_group_limited():
    """V2-Lite routes greedily (its n_group is ignored); V2/V2.5 score a group by its best expert, so one expert
    per group is enough."""
    greedy = tiny_model("deepseek_v2", n_group=4, topk_group=2)
    prune_experts(greedy, {1: [0, 1, 5]})
    assert greedy.config.experts_per_layer == [None, 3, 8]
    grouped = tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_experts(grouped, {1: [0, 1, 5]})
    prune_experts(grouped, {1: [1, 2, 5, 6]})
    assert grouped.config.kept_expert_ids[1] == [1, 2, 5, 6]


def test_unsupported_model_type_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    )
    with pytest.raises(ValueError, match=r"model_type 'llama' is not a supported MoE family; supported: \[.*'mixtral'"):
        prune_experts(model, {0: [0, 1]})


def test_optimizer_hook_sees_every_replaced_tensor():
    model = tiny_model("gpt_oss")
    seen = []
    prune_experts(model, {0: [1, 2, 5]}, on_tensor_replaced=lambda old, new, idx: seen.append((old.shape, new.shape)))
    assert len(seen) == 6  # router weight+bias, 2 expert weights, 2 expert biases
    assert all(o[0] == 8 and n[0] == 3 for o, n in seen)


@pytest.mark.parametrize(
    "family, fields",
    [
        ("deepseek_v3", dict(n_group=2, topk_group=1)),
        ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=1)),
        ("minicpm5_moe", {}),  # n_group=2 in its tiny config
        ("axk2", {}),  # other groups masked with 0.0
    ],
)
def test_dropping_group_limited_routing_equals_a_model_configured_without_groups(family, fields, tmp_path):
    """`ungroup_routing` sets the group fields to 1 in the config and in every router that cached them: the model
    then computes exactly what the stock class built from that config computes. A plan that breaks the groups is
    refused (naming the option) and, with drop_group_limited_routing=True, prunes, saves as the stock architecture
    with n_group 1 and reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    from hf_moeprune import ungroup_routing

    model = tiny_model(family, **fields)
    adapter = hf_moeprune.get_adapter(model)
    group_field, topk_group_field = adapter.group_field, adapter.topk_group_field
    assert adapter.num_groups(model.config) > 1
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grouped = model(ids).logits
    config = model.config.to_dict()
    config.update({group_field: 1, topk_group_field: 1})
    reference = AutoModelForCausalLM.from_config(type(model.config).from_dict(config))
    reference.load_state_dict(model.state_dict())
    ungroup_routing(model)
    assert (getattr(model.config, group_field), getattr(model.config, topk_group_field)) == (1, 1)
    with torch.no_grad():
        ungrouped = model(ids).logits
        assert torch.equal(ungrouped, reference(ids).logits)
    assert not torch.equal(ungrouped, grouped)  # the groups did restrict routing on these tokens

    model = tiny_model(family, **fields)
    moe_layers = adapter.moe_layer_indices(model)
    breaking = {layer: [0, 1, 2, 3, 4, 5][: max(adapter.top_k(model.config), 3)] for layer in moe_layers}
    with pytest.raises(ValueError, match="drop_group_limited_routing=True"):
        prune_experts(model, breaking)
    assert adapter.num_experts(adapter.decoder_layers(model)[moe_layers[0]]) == 8  # refused before any change
    prune_experts(model, breaking, drop_group_limited_routing=True)
    with torch.no_grad():
        expected = model(ids).logits
    with torch.no_grad():
        assert torch.equal(expected, prune_experts(reference, breaking)(ids).logits)
    model.save_pretrained(tmp_path)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert saved.config.model_type == family and getattr(saved.config, group_field) == 1
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, expected, rtol=0, atol=1e-6)


def test_ungroup_routing_refuses_a_router_caching_groups_under_an_unknown_name():
    from hf_moeprune import ungroup_routing

    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    adapter = hf_moeprune.get_adapter(model)
    router = adapter.router(adapter.decoder_layers(model)[1])
    router.expert_groups = 2
    with pytest.raises(ValueError, match=r"expert_groups = 2 looks like a cached group count"):
        ungroup_routing(model)
    assert model.config.n_group == 2 and router.num_group == 2  # nothing changed
