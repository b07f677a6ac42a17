"""The MoE families hf_moeprune supports, one registration each.

Router semantics that decide whether removing an unused expert changes outputs:
- Mixtral, MiniMax, GPT-OSS, GraniteMoE: the combine weights are renormalised over the chosen top-k
  -> invariant holds.
- Qwen2-MoE, Qwen3-MoE, Qwen3-Next, OLMoE, FlexOlmo: softmax over all experts, renormalised only if
  ``norm_topk_prob``; without it, removing an expert changes the softmax denominator and hence the weights.
- DeepSeek-V3, GLM-4-MoE, dots1: per-expert sigmoid scores (no shared denominator) -> invariant holds with
  one group; with group-limited routing a group's score is the sum of its top-2 members, so removing an
  unused expert can change which groups win.
"""

from __future__ import annotations

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

GLM4_MOE = register_adapter(
    MoEAdapter(
        model_type="glm4_moe",
        num_experts_field="n_routed_experts",
        router_tensors=("weight", "e_score_correction_bias"),
        score_function="sigmoid",
        routing="sigmoid_group_limited",
        group_field="n_group",
        topk_group_field="topk_group",
    )
)

DOTS1 = register_adapter(
    MoEAdapter(
        model_type="dots1",
        num_experts_field="n_routed_experts",
        router_tensors=("weight", "e_score_correction_bias"),
        score_function="sigmoid",
        routing="sigmoid_group_limited",
        group_field="n_group",
        topk_group_field="topk_group",
    )
)

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
