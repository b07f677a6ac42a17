"""The MoE families hf_moeprune supports, one registration each.

Router semantics that decide whether removing an unused expert changes outputs:
- Mixtral, MiniMax, GPT-OSS, GraniteMoE, HunYuan-MoE-V1: the combine weights are renormalised over the
  chosen top-k -> invariant holds.
- Qwen2-MoE, Qwen3-MoE, Qwen3-Next, OLMoE, FlexOlmo: softmax over all experts, renormalised only if
  ``norm_topk_prob``; without it, removing an expert changes the softmax denominator and hence the weights.
- Jamba: softmax over all experts, never renormalised -> the same experts win, but every weight is divided
  by the probability mass of the kept experts.
- DeepSeek-V2: as Jamba, times ``routed_scaling_factor``; with ``topk_method="group_limited_greedy"`` a
  group's score is its best member's probability, so removing an unused expert keeps the winning groups
  as long as every group's best member survives.
- DeepSeek-V3, GLM-4-MoE, dots1: per-expert sigmoid scores (no shared denominator) -> invariant holds with
  one group; with group-limited routing a group's score is the sum of its top-2 members, so removing an
  unused expert can change which groups win.
"""

from __future__ import annotations

from dataclasses import replace

from hf_moeprune.adapters.base import MoEAdapter, register_adapter


def _norm_topk(config) -> bool:
    return bool(getattr(config, "norm_topk_prob", False))


MIXTRAL = register_adapter(MoEAdapter(model_type="mixtral", num_experts_field="num_local_experts"))

# MiniMax's router is Mixtral's; its lightning/full attention alternation does not touch the MoE blocks.
MINIMAX = register_adapter(MoEAdapter(model_type="minimax", num_experts_field="num_local_experts"))

QWEN2_MOE = register_adapter(
    MoEAdapter(model_type="qwen2_moe", num_experts_field="num_experts", renormalizes=_norm_topk, routing="softmax_topk")
)

QWEN3_MOE = register_adapter(
    MoEAdapter(model_type="qwen3_moe", num_experts_field="num_experts", renormalizes=_norm_topk, routing="softmax_topk")
)

QWEN3_NEXT = register_adapter(
    MoEAdapter(
        model_type="qwen3_next", num_experts_field="num_experts", renormalizes=_norm_topk, routing="softmax_topk"
    )
)

OLMOE = register_adapter(
    MoEAdapter(model_type="olmoe", num_experts_field="num_experts", renormalizes=_norm_topk, routing="softmax_topk")
)

FLEX_OLMO = register_adapter(
    MoEAdapter(model_type="flex_olmo", num_experts_field="num_experts", renormalizes=_norm_topk, routing="softmax_topk")
)

DEEPSEEK_V3 = register_adapter(
    MoEAdapter(
        model_type="deepseek_v3",
        num_experts_field="n_routed_experts",
        router_tensors=("weight", "e_score_correction_bias"),
        score_function="sigmoid",
        routing="sigmoid_group_limited",
        group_field="n_group",
        topk_group_field="topk_group",
    )
)

# GLM-4-MoE and dots1 route exactly like DeepSeek-V3 (their routers are copies of it).
GLM4_MOE = register_adapter(replace(DEEPSEEK_V3, model_type="glm4_moe"))
DOTS1 = register_adapter(replace(DEEPSEEK_V3, model_type="dots1"))

GPT_OSS = register_adapter(
    MoEAdapter(
        model_type="gpt_oss",
        num_experts_field="num_local_experts",
        router_attr="router",
        router_tensors=("weight", "bias"),
        expert_tensors=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        routing="topk_softmax",
    )
)

# GraniteMoE routes like GPT-OSS without biases: top-k on the logits, softmax over the chosen k.
GRANITEMOE = register_adapter(
    MoEAdapter(
        model_type="granitemoe",
        num_experts_field="num_local_experts",
        block_attr="block_sparse_moe",
        router_attr="router",
        routing="topk_softmax",
    )
)


# DeepSeek-V2 (and V2.5): softmax, never renormalised, x routed_scaling_factor; ``norm_topk_prob`` exists in the
# config but the router ignores it. Groups count only with topk_method="group_limited_greedy" (V2-Lite is greedy).
DEEPSEEK_V2 = register_adapter(
    MoEAdapter(
        model_type="deepseek_v2",
        num_experts_field="n_routed_experts",
        renormalizes=lambda config: False,
        routing="softmax_topk_scaled",
        group_field="n_group",
        topk_group_field="topk_group",
        group_limited=lambda config: getattr(config, "topk_method", None) == "group_limited_greedy",
        group_score_experts=1,
    )
)

# Jamba: Mamba/attention layers; only the layers with config.layers_num_experts[i] > 1 have a MoE block (the
# others' feed_forward is a dense MLP without a router, so moe_block() skips them).
JAMBA = register_adapter(
    MoEAdapter(
        model_type="jamba",
        num_experts_field="num_experts",
        block_attr="feed_forward",
        router_attr="router",
        renormalizes=lambda config: False,
        routing="softmax_topk",
    )
)

# HunYuan-MoE-V1 routes like Mixtral; its router weight sits one module deeper (mlp.gate.wg.weight).
HUNYUAN_V1_MOE = register_adapter(
    MoEAdapter(model_type="hunyuan_v1_moe", num_experts_field="num_experts", router_tensors=("wg.weight",))
)
