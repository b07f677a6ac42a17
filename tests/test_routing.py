import pytest
import torch

import hf_moeprune
from hf_moeprune.adapters.discovery import block_router_args, call_router
from hf_moeprune.demo.tiny_models import TINY_CONFIGS, tiny_config, tiny_model

FAMILIES = sorted(TINY_CONFIGS)
V2_GROUPED = {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}  # DeepSeek-V2/V2.5 routing
CASES = (
    [(family, {}) for family in FAMILIES]
    + [
        (family, {"norm_topk_prob": False})
        for family in FAMILIES
        if hasattr(hf_moeprune.get_adapter(tiny_config(family)).moe_config(tiny_config(family)), "norm_topk_prob")
    ]
    + [
        (family, {"n_group": 2, "topk_group": 1})
        for family in FAMILIES
        if hf_moeprune.get_adapter(tiny_config(family)).group_field is not None
    ]
    + [
        # DeepSeek-V2/V2.5: groups scored by their best expert, unsorted top-k, scaled weights. With top-k <=
        # topk_group the best-expert group scores always keep the greedy winners; top-k 3 makes the mask matter.
        ("deepseek_v2", {**V2_GROUPED, "routed_scaling_factor": 16.0}),
        ("deepseek_v2", {**V2_GROUPED, "num_experts_per_tok": 3}),
        ("deepseek_v2", {"routed_scaling_factor": 2.5}),
    ]
)


@pytest.mark.parametrize("family, overrides", CASES)
def test_route_function_reproduces_stock_router_exactly(family, overrides):
    model = tiny_model(family, **overrides)
    adapter = hf_moeprune.get_adapter(model)
    hidden_size = adapter.moe_config(model.config).hidden_size  # the language model's, in vision-language models
    hidden = torch.randn(37, hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in adapter.moe_layer_indices(model):
        router = adapter.router(adapter.decoder_layers(model)[layer])
        args = block_router_args(adapter.moe_block(adapter.decoder_layers(model)[layer]), adapter.block_tensors)
        output = call_router(router, hidden, *args)
        logits, weights, indices = adapter.unpack_router_output(router, output)
        w, i = adapter.route(router, logits, None, *args)
        assert torch.equal(i, indices)
        assert torch.equal(w, weights) and w.dtype == weights.dtype
        # written back in the router's own form (Llama 4: scores scattered over all experts), the whole output
        repacked = adapter.pack_router_output(router, output, w, i)
        assert len(repacked) == len(output) and all(torch.equal(a, b) for a, b in zip(repacked, output))


def test_selection_bias_changes_choice_not_weights():
    model = tiny_model("mixtral")
    adapter = hf_moeprune.get_adapter(model)
    router = adapter.router(adapter.decoder_layers(model)[0])
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(8)
    bias[3] = float("-inf")
    bias[5] = 10.0  # always chosen
    w, i = adapter.route(router, logits, bias)
    assert not (i == 3).any() and (i == 5).any(dim=-1).all()
    probs = torch.softmax(logits, -1)
    expected = probs.gather(-1, i)
    torch.testing.assert_close(w, expected / expected.sum(-1, keepdim=True))


def test_deepseek_v2_group_limited_routing_differs_from_greedy():
    """The group-limited case above is a real test of the group mask: it changes the choice of most tokens."""
    model = tiny_model("deepseek_v2", **V2_GROUPED, num_experts_per_tok=3)
    adapter = hf_moeprune.get_adapter(model)
    assert adapter.num_groups(model.config) == 4 and adapter.num_groups(tiny_config("deepseek_v2", n_group=4)) == 1
    router = adapter.router(adapter.decoder_layers(model)[adapter.moe_layer_indices(model)[0]])
    logits = torch.randn(37, 8, generator=torch.Generator().manual_seed(0))
    _, grouped = adapter.route(router, logits)
    router.topk_method = "greedy"
    _, greedy = adapter.route(router, logits)
    assert (grouped.sort(-1).values != greedy.sort(-1).values).any(-1).sum() > 10


def test_phimoe_rule_is_eval_mode_sparsemixer_and_refuses_training():
    """PhiMoE's rule is SparseMixer's deterministic (eval) top-2; in training the stock router samples, so applying a
    selection bias there is refused instead of silently replacing the sampled choice."""
    model = tiny_model("phimoe")
    adapter = hf_moeprune.get_adapter(model)
    router = adapter.router(adapter.decoder_layers(model)[0])
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    weights, indices = adapter.route(router, logits)
    assert torch.equal(indices[:, 0], logits.argmax(-1))  # the best expert first, then the best of the rest
    bias = torch.zeros(8)
    bias[5] = 100.0
    assert (adapter.route(router, logits, bias)[1] == 5).any(dim=-1).all()
    router.train()
    with pytest.raises(RuntimeError, match="samples experts in training"):
        adapter.route(router, logits, bias)
