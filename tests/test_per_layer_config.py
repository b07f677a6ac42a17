"""Per-layer expert counts in transformers' own convention (``per_layer_config``, HeterogeneousConfigMixin, 5.24),
both directions: what hf_moeprune writes is read by transformers' config machinery, and what transformers' convention
states is read by hf_moeprune's layout reader and checked against the pruned format's own fields."""

import json

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.integrations.heterogeneity.configuration_utils import AmbiguousGlobalPerLayerAttributeError

import hf_moeprune  # noqa: F401  (registers the pruned classes)
from hf_moeprune import PrunedConfigError, prune_experts
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.format.layout import expert_layout, per_layer_expert_counts

PLAN = {0: [0, 1, 2, 3, 4, 5], 1: [7, 5, 3, 1], 2: [2, 3, 4, 5, 6, 7]}  # 6, 4, 6 experts
IDS = torch.arange(3, 20)[None]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def per_layer_checkpoint(tmp_path):
    model = tiny_model("mixtral")
    prune_experts(model, PLAN)
    model.save_pretrained(tmp_path, export_stock=False)
    return model, tmp_path


def test_pruned_counts_are_in_transformers_per_layer_config(per_layer_checkpoint):
    model, path = per_layer_checkpoint
    # in memory: transformers' public accessor answers each layer's count
    assert [model.config.per_layer_config[i].num_local_experts for i in range(3)] == [6, 4, 6]
    saved = json.loads((path / "config.json").read_text())
    # only the layer that differs from the global (widest) count, as transformers writes it
    assert saved["num_local_experts"] == 6 and saved["per_layer_config"] == {"1": {"num_local_experts": 4}}
    assert saved["allow_global_per_layer_attribute_access"] is True
    # transformers' own machinery, without hf_moeprune's classes: the stock config class reads the checkpoint's counts
    stock = MixtralConfig.from_pretrained(path)
    assert type(stock) is MixtralConfig and stock.is_heterogeneous
    assert [stock.per_layer_config[i].num_local_experts for i in range(3)] == [6, 4, 6]
    assert stock.per_layer_attributes == {"num_local_experts"}
    # and hf_moeprune's own loading reads it back consistently
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert [reloaded.config.per_layer_config[i].num_local_experts for i in range(3)] == [6, 4, 6]
    assert torch.equal(_logits(reloaded), _logits(model))
    assert expert_layout(saved).experts_per_layer == (6, 4, 6) and per_layer_expert_counts(saved) == {1: 4}


def test_the_flag_is_what_keeps_stock_code_working(per_layer_checkpoint):
    """Why the flag is written: without it, reading the global count (as every 5.24 MoE modeling does) raises."""
    _, path = per_layer_checkpoint
    saved = json.loads((path / "config.json").read_text())
    del saved["allow_global_per_layer_attribute_access"]
    saved["model_type"] = "mixtral"
    config = MixtralConfig.from_dict(saved)
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        config.num_local_experts  # noqa: B018
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        MixtralForCausalLM(config)


def test_a_uniform_export_carries_no_per_layer_config(tmp_path):
    model = tiny_model("mixtral")
    prune_experts(model, {0: [0, 1, 2, 3, 4, 5], 1: [7, 5, 3, 1], 2: [0, 1, 2, 3, 4, 5]})
    prune_experts(model, {0: [0, 1, 2, 3], 2: [5, 4, 3, 2]})  # now 4 everywhere: the per-layer record goes away
    assert not model.config.is_heterogeneous
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mixtral" and saved["num_local_experts"] == 4
    assert "per_layer_config" not in saved and "allow_global_per_layer_attribute_access" not in saved
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(stock) is MixtralForCausalLM
    torch.testing.assert_close(_logits(stock), expected, rtol=0, atol=1e-6)


def test_a_config_in_transformers_convention_is_read_by_the_layout_reader(tmp_path):
    config = MixtralConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        num_local_experts=8, per_layer_config={1: {"num_local_experts": 4}, 2: {"num_local_experts": 8}},
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["per_layer_config"] == {"1": {"num_local_experts": 4}}  # transformers drops what equals the global
    for source in (saved, AutoConfig.from_pretrained(tmp_path), config):
        layout = expert_layout(source)
        assert layout.experts_per_layer == (8, 4, 8) and layout.original_num_experts == 8
        assert layout.kept_expert_ids[1] == (0, 1, 2, 3) and per_layer_expert_counts(source) == {1: 4}
    assert not config.allow_global_per_layer_attribute_access  # reading did not change the user's config
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        config.num_local_experts  # noqa: B018


def test_per_layer_config_contradicting_experts_per_layer_is_refused(per_layer_checkpoint):
    _, path = per_layer_checkpoint
    saved = json.loads((path / "config.json").read_text())
    saved["per_layer_config"] = {"1": {"num_local_experts": 5}}
    (path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="layer 1: per_layer_config gives 5 experts but experts_per_layer gives 4"):
        expert_layout(saved)
    with pytest.raises(PrunedConfigError, match="layer 1: per_layer_config gives num_local_experts=5"):
        AutoModelForCausalLM.from_pretrained(path)


def test_vision_language_counts_go_to_the_text_config(tmp_path):
    model = tiny_model("qwen3_vl_moe")
    prune_experts(model, PLAN)
    model.save_pretrained(tmp_path, export_stock=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["text_config"]["per_layer_config"] == {"1": {"num_local_experts": 4}}
    assert "per_layer_config" not in saved or not saved["per_layer_config"]
    stock = transformers.Qwen3VLMoeConfig.from_pretrained(tmp_path)
    assert [stock.text_config.per_layer_config[i].num_local_experts for i in range(3)] == [6, 4, 6]
    assert expert_layout(saved).experts_per_layer == (6, 4, 6) and per_layer_expert_counts(saved) == {1: 4}


@pytest.mark.parametrize(
    "plan, recorded",
    [
        ({0: [0, 1, 2, 3, 4, 5], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}, {"1": {"num_experts": 4}, "2": {"num_experts": 4}}),
        ({0: [0, 1, 2, 3, 4, 5], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3, 4, 5]}, None),  # two linear_attention layers differ
    ],
)
def test_counts_that_differ_within_a_layer_type_stay_out_of_per_layer_config(tmp_path, plan, recorded):
    """Modeling code asks ``per_layer_config[layer_type]`` (Gemma 4's rotary embeddings), which transformers refuses
    once two layers of one type differ: such counts are recorded in experts_per_layer only, and the model reloads."""
    model = tiny_model("qwen3_5_moe_text")  # layer_types: full_attention, linear_attention, linear_attention
    prune_experts(model, plan)
    model.save_pretrained(tmp_path, export_stock=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.get("per_layer_config") == recorded
    assert expert_layout(saved).experts_per_layer == tuple(len(plan[i]) for i in range(3))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded), _logits(model))
