import pytest
import torch

import hf_moeprune
from hf_moeprune.tiny_models import TINY_CONFIGS, tiny_config, tiny_model

FAMILIES = sorted(TINY_CONFIGS)
CASES = (
    [(family, {}) for family in FAMILIES]
    + [(family, {"norm_topk_prob": False}) for family in FAMILIES if hasattr(tiny_config(family), "norm_topk_prob")]
    + [
        (family, {"n_group": 2, "topk_group": 1})
        for family in FAMILIES
        if hf_moeprune.get_adapter(tiny_config(family)).group_field is not None
    ]
)


@pytest.mark.parametrize("family, overrides", CASES)
def test_route_function_reproduces_stock_router_exactly(family, overrides):
    model = tiny_model(family, **overrides)
    adapter = hf_moeprune.get_adapter(model)
    hidden = torch.randn(37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in adapter.moe_layer_indices(model):
        router = adapter.router(adapter.decoder_layers(model)[layer])
        logits, weights, indices = router(hidden)
        w, i = adapter.route(router, logits)
        assert torch.equal(i, indices)
        assert torch.equal(w, weights) and w.dtype == weights.dtype


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
