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

Adding a family is one `register_family(MoEAdapter(...))` here, naming only what differs from transformers' v5
layout (router ``mlp.gate`` holding ``weight``, experts ``mlp.experts`` with ``gate_up_proj``/``down_proj``, the
Mixtral rule), plus a tiny config for the tests. ``tests/test_families.py`` then checks the declaration against
the model (`adapters.discovery`), the routing rule bit for bit against the stock router, and runs prune / save /
reload / stock export / generate on the tiny model; the README's family table is generated from this file.
Families that cannot be supported are listed with `register_unsupported(model_type, reason)` at the end.

Router rows after the routed experts (``extra_rows_field``, issue 13): some routers score rows that are not routed
experts after the routed ones, LongCat-Flash's ``zero_expert_num`` zero-computation (identity) experts and Inkling's
``n_shared_experts`` shared experts. A declaration names the config field counting them (``extra_rows_field``; the
router or the MoE block keeps the count under the same name), the router tensors holding them
(``extra_row_tensors``), and the attributes caching counts that surgery must follow: ``routed_count_attributes``
(the routed count, relative to the MoE block, e.g. LongCat's ``num_routed_experts``, from which its index arithmetic
``n_routed_experts + j`` reaches zero expert j) and ``total_count_attributes`` (routed + extra). Surgery removes and
reorders routed experts only and keeps the extra rows at the end, in order; the statistics count routed experts
only; the pruned config records the layout (``expert_extra_rows_field``, ``expert_extra_row_tensors``,
``expert_total_count_attributes``) so ``modeling_moeprune.py`` rebuilds it, and a stock export is the stock config
with the kept routed count. ``layers_field`` names the decoder-layer count where ``num_hidden_layers`` is not it
(LongCat counts two attention sublayers per decoder layer there).
The tiny configs of the families added in 2026-12 are transformers' own test-suite configs (ModelTester) with 8
experts and top-k 2.
"""

from __future__ import annotations

from typing import Any

from hf_moeprune.adapters.base import (
    ADAPTERS,
    NOT_INSTALLED,
    UNSUPPORTED,
    KeepAllExperts,
    MoEAdapter,
    register_family,
    register_unsupported,
)

# Shared by the tiny configs of the first 15 families (3 layers, hidden 32, 8 experts of which 2 per token).
_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _tiny(**fields: Any) -> dict[str, Any]:
    return {**_COMMON, **fields}


# DeepSeek-V3's MoE block (sigmoid router with e_score_correction_bias, shared experts, dense first layer)
_SIGMOID_ROUTED: dict[str, Any] = dict(
    intermediate_size=64,
    moe_intermediate_size=24,
    n_routed_experts=8,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    head_dim=8,
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
)
_DEEPSEEK_V3_ROUTER: dict[str, Any] = dict(
    router_tensors=("weight", "e_score_correction_bias"),
    score_function="sigmoid",
    routing="sigmoid_group_limited",
    group_field="n_group",
    topk_group_field="topk_group",
)
_GRANITE_ROUTER: dict[str, Any] = dict(block_attr="block_sparse_moe", router_attr="router", routing="topk_softmax")


MIXTRAL = register_family(
    MoEAdapter(model_type="mixtral", tiny_config=_tiny(intermediate_size=48, num_local_experts=8))
)

# MiniMax's router is Mixtral's; its lightning/full attention alternation does not touch the MoE blocks.
MINIMAX = register_family(
    MoEAdapter(
        model_type="minimax",
        tiny_config=_tiny(
            intermediate_size=48,
            num_local_experts=8,
            head_dim=8,
            block_size=16,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
    )
)

# Qwen2/3-MoE, Qwen3-Next, OLMoE, FlexOlmo: softmax top-k, renormalised only with norm_topk_prob.
QWEN2_MOE = register_family(
    MoEAdapter(
        model_type="qwen2_moe",
        routing="softmax_topk",
        skip_quantization=("mlp.shared_expert_gate.weight",),
        tiny_config=_tiny(
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            num_experts=8,
            norm_topk_prob=True,
        ),
    )
)

QWEN3_MOE = register_family(
    MoEAdapter(
        model_type="qwen3_moe",
        routing="softmax_topk",
        tiny_config=_tiny(
            intermediate_size=64, moe_intermediate_size=24, num_experts=8, norm_topk_prob=True, head_dim=8
        ),
    )
)

QWEN3_NEXT = register_family(
    MoEAdapter(
        model_type="qwen3_next",
        routing="softmax_topk",
        skip_quantization=("mlp.shared_expert_gate.weight",),
        tiny_config=_tiny(
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            num_experts=8,
            norm_topk_prob=True,
            head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
        ),
    )
)

OLMOE = register_family(
    MoEAdapter(
        model_type="olmoe",
        routing="softmax_topk",
        tiny_config=_tiny(intermediate_size=24, num_experts=8, norm_topk_prob=True),
    )
)

FLEX_OLMO = register_family(
    MoEAdapter(
        model_type="flex_olmo",
        routing="softmax_topk",
        tiny_config=_tiny(intermediate_size=24, num_experts=8, norm_topk_prob=True),
    )
)

DEEPSEEK_V3 = register_family(
    MoEAdapter(
        model_type="deepseek_v3",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config=_tiny(
            intermediate_size=64,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=1.0,
        ),
    )
)

# GLM-4-MoE and dots1 route exactly like DeepSeek-V3 (their routers are copies of it).
GLM4_MOE = register_family(
    MoEAdapter(model_type="glm4_moe", **_DEEPSEEK_V3_ROUTER, tiny_config=_tiny(**_SIGMOID_ROUTED))
)
DOTS1 = register_family(MoEAdapter(model_type="dots1", **_DEEPSEEK_V3_ROUTER, tiny_config=_tiny(**_SIGMOID_ROUTED)))

GPT_OSS = register_family(
    MoEAdapter(
        model_type="gpt_oss",
        router_attr="router",
        router_tensors=("weight", "bias"),
        expert_tensors=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        routing="topk_softmax",
        tiny_config=_tiny(
            intermediate_size=24,
            num_local_experts=8,
            head_dim=8,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    )
)

# GraniteMoE routes like GPT-OSS without biases: top-k on the logits, softmax over the chosen k.
GRANITEMOE = register_family(
    MoEAdapter(model_type="granitemoe", **_GRANITE_ROUTER, tiny_config=_tiny(intermediate_size=48, num_local_experts=8))
)


# DeepSeek-V2 (and V2.5): softmax, never renormalised, x routed_scaling_factor; ``norm_topk_prob`` exists in the
# config but the router ignores it. Groups count only with topk_method="group_limited_greedy" (V2-Lite is greedy).
DEEPSEEK_V2 = register_family(
    MoEAdapter(
        model_type="deepseek_v2",
        routing="softmax_topk_scaled",
        group_field="n_group",
        topk_group_field="topk_group",
        group_limited=lambda config: getattr(config, "topk_method", None) == "group_limited_greedy",
        group_score_experts=1,
        tiny_config=_tiny(
            intermediate_size=64,
            moe_intermediate_size=24,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    )
)

# Jamba: Mamba/attention layers; only the layers with config.layers_num_experts[i] > 1 have a MoE block (the
# others' feed_forward is a dense MLP without a router, so moe_block() skips them). Softmax over all experts,
# never renormalised (its router has no norm_topk_prob). Tiny model: MoE feed-forward in layers 0 and 2 (layer 1
# is dense); attention in layer 2, Mamba (torch path) in 0 and 1.
JAMBA = register_family(
    MoEAdapter(
        model_type="jamba",
        block_attr="feed_forward",
        router_attr="router",
        routing="softmax_topk",
        tiny_config=_tiny(
            intermediate_size=48,
            num_experts=8,
            expert_layer_period=2,
            expert_layer_offset=0,
            attn_layer_period=3,
            attn_layer_offset=2,
            mamba_d_state=4,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
        ),
    )
)

# HunYuan-MoE-V1 routes like Mixtral; its router weight sits one module deeper (mlp.gate.wg.weight).
HUNYUAN_V1_MOE = register_family(
    MoEAdapter(
        model_type="hunyuan_v1_moe",
        router_tensors=("wg.weight",),
        tiny_config=_tiny(intermediate_size=48, num_experts=8, moe_topk=2, head_dim=8),
    )
)

# -- families added from transformers 5.24 (tiny configs: transformers' own ModelTester configs) ------------------
# Aria (text model): routes like GPT-OSS without biases: top-k on logits, softmax over the k.
register_family(
    MoEAdapter(
        model_type="aria_text",
        router_attr="router",
        routing="topk_softmax",
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 60,
            "pad_token_id": 1,
            "rope_parameters": {"rope_theta": 5000000, "rope_type": "default"},
            "head_dim": 4,
            "moe_num_experts": 8,
            "moe_intermediate_size": 4,
            "num_experts_per_tok": 2,
            "moe_topk": 2,
        },
    )
)

# A.X K1: DeepSeek-V3 router.
register_family(
    MoEAdapter(
        model_type="axk1",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "n_routed_experts": 8,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 32,
            "v_head_dim": 32,
            "qk_nope_head_dim": 16,
            "n_group": 2,
            "topk_group": 1,
            "num_experts_per_tok": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "qk_head_dim": 48,
            "head_dim": 32,
        },
    )
)

# Bailing (Ling) hybrid: DeepSeek-V3 router; groups under num_expert_group.
register_family(
    MoEAdapter(
        model_type="bailing_hybrid",
        num_experts_field="num_experts",
        top_k_field="num_experts_per_token",
        **{**_DEEPSEEK_V3_ROUTER, "group_field": "num_expert_group"},
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
            "qk_nope_head_dim": 32,
            "num_expert_group": 1,
            "topk_group": 1,
            "num_experts_per_token": 2,
            "first_k_dense_replace": 1,
            "model_max_length": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "num_experts": 8,
            "head_dim": 16,
            "short_conv_kernel_size": 2,
            "layer_types": ["linear_attention", "full_attention", "full_attention"],
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "linear_head_dim": 16,
            "linear_num_heads": 2,
            "linear_conv_kernel_dim": 2,
            "qk_head_dim": 48,
        },
    )
)

# Cohere2-MoE: top-k on logits, softmax over the k (expert_selection_fn="softmax").
register_family(
    MoEAdapter(
        model_type="cohere2_moe",
        routing="topk_softmax",
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "logit_scale": 1.0,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "num_experts": 8,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "num_experts_per_tok": 2,
        },
    )
)

# DeepSeek-V3.2: V3 router; its sparse (indexed) attention does not touch the MoE blocks.
register_family(
    MoEAdapter(
        model_type="deepseek_v32",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "n_routed_experts": 8,
            "kv_lora_rank": 32,
            "q_lora_rank": 16,
            "qk_nope_head_dim": 64,
            "n_group": 1,
            "topk_group": 1,
            "num_experts_per_tok": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "first_k_dense_replace": 1,
            "layer_types": ["indexed_attention", "indexed_attention", "indexed_attention"],
            "qk_head_dim": 128,
        },
    )
)

# dots3 (text model): DeepSeek-V3 router.
register_family(
    MoEAdapter(
        model_type="dots3_note_text",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "kv_lora_rank": 16,
            "q_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "qk_nope_head_dim": 8,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 128,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 80000000.0, "partial_rotary_factor": 0.5},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5},
            },
            "mlp_layer_types": ["dense", "sparse"],
            "index_topk": 4,
            "index_n_heads": 2,
            "head_dim": 16,
            "layer_types": ["full_attention", "sliding_attention"],
            "sliding_window": 128,
            "shared_experts_intermediate_size": 16,
            "per_layer_config": {},
        },
    )
)

# EXAONE-MoE: DeepSeek-V3 router.
register_family(
    MoEAdapter(
        model_type="exaone_moe",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "eos_token_id": 2,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention"],
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "moe_intermediate_size": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
        },
    )
)

# GLM-4-MoE-Lite (GLM-4.7-Flash): DeepSeek-V3 router with MLA attention.
register_family(
    MoEAdapter(
        model_type="glm4_moe_lite",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "n_routed_experts": 8,
            "kv_lora_rank": 32,
            "q_lora_rank": 16,
            "v_head_dim": 128,
            "qk_nope_head_dim": 64,
            "num_experts_per_tok": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "qk_head_dim": 128,
        },
    )
)

# GLM-5 (MoE + DeepSeek sparse attention): DeepSeek-V3 router.
register_family(
    MoEAdapter(
        model_type="glm_moe_dsa",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "n_routed_experts": 8,
            "kv_lora_rank": 32,
            "q_lora_rank": 16,
            "v_head_dim": 128,
            "qk_nope_head_dim": 64,
            "num_experts_per_tok": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "mlp_layer_types": ["sparse", "dense", "sparse"],
            "layer_types": ["indexed_attention", "indexed_attention", "indexed_attention"],
            "indexer_types": ["full", "full", "full"],
            "qk_head_dim": 128,
        },
    )
)

# GraniteMoE with sliding-window attention: GraniteMoE router.
register_family(
    MoEAdapter(
        model_type="granitemoe_swa",
        **_GRANITE_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
            "layer_rope_theta": [10000.0, 10000.0, 10000.0],
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
    )
)

# Granite-4 hybrid (Mamba2 + attention): GraniteMoE router in every layer; its shared MLP is dense.
register_family(
    MoEAdapter(
        model_type="granitemoehybrid",
        **_GRANITE_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "shared_intermediate_size": 174,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
            "mamba_n_heads": 16,
            "mamba_d_state": 16,
            "mamba_d_head": 4,
            "mamba_chunk_size": 16,
            "attn_layer_indices": [1, 3],
            "attn_rotary_emb": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
    )
)

# GraniteMoE with a shared MLP: GraniteMoE router.
register_family(
    MoEAdapter(
        model_type="granitemoeshared",
        **_GRANITE_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 40,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "shared_intermediate_size": 174,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
    )
)

# Hunyuan-V4: DeepSeek-V3 router.
register_family(
    MoEAdapter(
        model_type="hy_v4",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 4,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "q_lora_rank": 16,
            "kv_lora_rank": 8,
            "qk_nope_head_dim": 4,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "layer_types": ["indexed_attention", "indexed_attention", "indexed_attention"],
            "index_topk": 8,
            "index_head_dim": 8,
            "index_n_heads": 4,
            "indexer_types": ["full", "shared", "shared"],
            "qk_head_dim": 8,
        },
    )
)

# Kimi-Linear: DeepSeek-V3 router; groups under num_expert_group, top-k under num_experts_per_token.
register_family(
    MoEAdapter(
        model_type="kimi_linear",
        num_experts_field="num_experts",
        top_k_field="num_experts_per_token",
        **{**_DEEPSEEK_V3_ROUTER, "group_field": "num_expert_group"},
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
            "qk_nope_head_dim": 32,
            "num_experts_per_token": 2,
            "model_max_length": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "layer_types": ["linear_attention", "full_attention", "full_attention"],
            "linear_head_dim": 16,
            "linear_num_heads": 4,
            "linear_conv_kernel_dim": 2,
            "qk_head_dim": 48,
            "head_dim": 16,
            "num_experts": 8,
        },
    )
)

# Mellum: softmax top-k, renormalised with norm_topk_prob.
register_family(
    MoEAdapter(
        model_type="mellum",
        routing="softmax_topk",
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "moe_intermediate_size": 16,
            "num_experts_per_tok": 2,
            "num_local_experts": 8,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": 16,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
            "mlp_layer_types": ["dense", "sparse", "sparse"],
        },
    )
)

# MiMo-V2-Flash: DeepSeek-V3 router.
register_family(
    MoEAdapter(
        model_type="mimo_v2_flash",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            },
            "moe_intermediate_size": 16,
            "num_experts_per_tok": 2,
            "n_routed_experts": 8,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "head_dim": 8,
            "v_head_dim": 16,
            "sliding_window": 64,
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
            "mlp_layer_types": ["dense", "sparse", "sparse"],
        },
    )
)

# Nemotron-H (Mamba2 + attention + MoE): DeepSeek-V3 router in the "moe" layers, non-gated experts (up_proj only).
register_family(
    MoEAdapter(
        model_type="nemotron_h",
        **_DEEPSEEK_V3_ROUTER,
        block_attr="mixer",
        expert_tensors=("up_proj", "down_proj"),
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "layers_block_type": ["linear_attention", "moe", "linear_attention", "full_attention", "moe"],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 512,
            "intermediate_size": 40,
            "use_mamba_kernels": False,
            "ssm_state_size": 16,
            "mamba_num_heads": 8,
            "mamba_head_dim": 16,
            "chunk_size": 64,
            "moe_intermediate_size": 40,
            "moe_shared_expert_intermediate_size": 40,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
        },
    )
)

# Qwen3.5-MoE (language model): Mixtral router (always renormalised) plus a gated shared expert.
register_family(
    MoEAdapter(
        model_type="qwen3_5_moe_text",
        skip_quantization=("mlp.shared_expert_gate.weight",),
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "max_position_embeddings": 512,
            "head_dim": 16,
            "linear_conv_kernel_dim": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 4,
            "linear_num_value_heads": 8,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 36,
            "num_experts_per_tok": 2,
            "num_experts": 8,
            "layer_types": ["full_attention", "linear_attention", "linear_attention"],
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    )
)

# Qwen4-Exp (language model): Qwen3-MoE router.
register_family(
    MoEAdapter(
        model_type="qwen4_exp_text",
        routing="softmax_topk",
        skip_quantization=("mlp.shared_expert_gate.weight",),
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "max_position_embeddings": 512,
            "head_dim": 8,
            "linear_conv_kernel_dim": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 4,
            "linear_num_value_heads": 8,
            "moe_intermediate_size": 8,
            "shared_expert_intermediate_size": 8,
            "num_experts_per_tok": 2,
            "num_experts": 8,
            "layer_types": ["indexed_attention", "linear_attention", "linear_attention"],
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hc_count": 2,
            "hc_lowrank": 8,
            "ple_embed_dim": 16,
            "ple_conv_kernel_size": 2,
            "heads_per_ngram": 2,
            "ngram_vocab_size_base": 31,
            "make_ngram_vocab_size_divisible_by": 8,
            "split_ngram_parts": 4,
            "indexer_n_heads": 2,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 8,
            "indexer_budget": 4,
            "indexer_compress_ratio": 2,
        },
    )
)

# Solar-Open: DeepSeek-V3 router.
register_family(
    MoEAdapter(
        model_type="solar_open",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "moe_intermediate_size": 16,
            "num_experts_per_tok": 2,
            "n_routed_experts": 8,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "head_dim": 16,
        },
    )
)

# Ernie-4.5-MoE: softmax, top-k chosen on probabilities + a [1, experts] correction bias (router.moe_statics), the k
# weights renormalised with a clamped sum. MoE layers from moe_layer_start_index to moe_layer_end_index.
register_family(
    MoEAdapter(
        model_type="ernie4_5_moe",
        router_tensors=("weight", "moe_statics.e_score_correction_bias"),
        routing="softmax_topk_renorm_biased",
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "hidden_act": "gelu",
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
            "moe_intermediate_size": 16,
            "moe_k": 2,
            "moe_num_experts": 8,
            "moe_layer_start_index": 0,
            "moe_layer_end_index": 2,
        },
    )
)

# MiniMax-M2 and HY-V3: sigmoid scores, the choice shifted by an e_score_correction_bias that the MoE block holds and
# passes to its router; HY-V3 scales the renormalised weights by router_scaling_factor.
register_family(
    MoEAdapter(
        model_type="minimax_m2",
        block_tensors=("e_score_correction_bias",),
        score_function="sigmoid",
        routing="sigmoid_topk_block_bias",
        tiny_config=_tiny(intermediate_size=32, num_local_experts=8, head_dim=8),
    )
)
register_family(
    MoEAdapter(
        model_type="hy_v3",
        block_tensors=("e_score_correction_bias",),
        score_function="sigmoid",
        routing="sigmoid_topk_block_bias",
        tiny_config=_tiny(
            intermediate_size=32,
            moe_intermediate_size=16,
            num_experts=8,
            head_dim=8,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    )
)

# LFM2-MoE (short convolutions + attention, dense first layers): sigmoid scores, the choice shifted by the block's
# expert_bias, renormalised with norm_topk_prob, x routed_scaling_factor.
register_family(
    MoEAdapter(
        model_type="lfm2_moe",
        block_attr="feed_forward",
        block_tensors=("expert_bias",),
        score_function="sigmoid",
        routing="sigmoid_topk_expert_bias",
        tiny_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "tie_word_embeddings": False,
            "max_position_embeddings": 512,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "num_dense_layers": 1,
            "num_experts_per_tok": 2,
            "num_experts": 8,
            "layer_types": ["full_attention", "conv", "full_attention"],
        },
    )
)

# -- families added in issue 13 (text MoE families that were listed unsupported) ---------------------------------------
# Tiny configs: 3 layers, hidden 32, 8 experts of which 2 per token, at least two MoE layers.
_TINY_13: dict[str, Any] = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=32,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    num_experts_per_tok=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Lara-Mini (gated delta-net + attention): Qwen3-MoE router (fp32 logits), an ungated shared expert.
register_family(
    MoEAdapter(
        model_type="lara_mini",
        routing="softmax_topk",
        tiny_config={
            **_TINY_13,
            "num_experts": 8,
            "shared_expert_intermediate_size": 24,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_conv_kernel_dim": 2,
        },
    )
)

# Flint: sigmoid scores without bias, sorted top-k, renormalised with norm_topk_prob; dense layers in mlp_only_layers.
register_family(
    MoEAdapter(
        model_type="flint",
        score_function="sigmoid",
        routing="sigmoid_topk",
        tiny_config={**_TINY_13, "num_experts": 8, "shared_expert_intermediate_size": 24, "mlp_only_layers": [0]},
    )
)

# Beam: DeepSeek-V3's group-limited sigmoid router with a sorted top-k; routed_scaling_factor scales the block output.
register_family(
    MoEAdapter(
        model_type="beam",
        **{**_DEEPSEEK_V3_ROUTER, "routing": "sigmoid_group_limited_sorted"},
        tiny_config={
            **_TINY_13,
            "num_experts": 8,
            "n_group": 2,
            "topk_group": 1,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "sliding_window": 16,
        },
    )
)


# Laguna: sigmoid scores of the (optionally tanh-softcapped) logits, sorted top-k on score + e_score_correction_bias,
# renormalised; the router returns the softcapped logits, so the rule applies to them as they are.
register_family(
    MoEAdapter(
        model_type="laguna",
        router_tensors=("weight", "e_score_correction_bias"),
        score_function="sigmoid",
        routing="sigmoid_topk",
        tiny_config={
            **_TINY_13,
            "head_dim": 8,
            "num_experts": 8,
            "shared_expert_intermediate_size": 16,
            "layer_types": ["full_attention", "sliding_attention", "full_attention"],
            "num_attention_heads_per_layer": [2, 2, 2],
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "moe_router_logit_softcapping": 30.0,
            "sliding_window": 32,
        },
    )
)

# Kolibri-1: top-k on logits + e_score_correction_bias, weights = sigmoid of the chosen logits (norm_topk_prob).
register_family(
    MoEAdapter(
        model_type="kolibri1",
        router_tensors=("weight", "e_score_correction_bias"),
        score_function="sigmoid",
        routing="logit_topk_sigmoid",
        tiny_config={
            **_TINY_13,
            "num_local_experts": 8,
            "norm_topk_prob": True,
            "shared_expert_intermediate_size": 36,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    )
)

# Llama 4 (Scout, Maverick): the router is an nn.Linear returning (the chosen experts' sigmoid scores scattered over all
# experts, logits); the block multiplies each token's input by every expert's score and runs all experts densely on
# transposed [experts, in, out] tensors; a shared expert; dense layers between the MoE ones (moe_layers).
register_family(
    MoEAdapter(
        model_type="llama4_text",
        block_attr="feed_forward",
        router_attr="router",
        score_function="sigmoid",
        routing="logit_topk_sigmoid_unnormalized",
        router_output="scores_logits",
        experts_call="dense_scaled_inputs",
        tiny_config={
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 32,  # experts' and shared expert's width (multiples of 16 fit the int4 kernel)
            "intermediate_size_mlp": 48,  # the dense layers' width
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 512,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "moe_layers": [0, 2],  # layer 1 is dense
            "attention_chunk_size": 32,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    )
)

# A.X K2: DeepSeek-V3 router whose group mask fills 0.0 (A.X-K2-Light: no groups, n_group None).
register_family(
    MoEAdapter(
        model_type="axk2",
        **{**_DEEPSEEK_V3_ROUTER, "routing": "sigmoid_group_limited_zero_fill"},
        tiny_config={
            **_TINY_13,
            "head_dim": 64,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "kv_lora_rank": 32,
            "q_lora_rank": 16,
            "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 64,
            "qk_head_dim": 128,
            "v_head_dim": 32,
            "index_topk": 8,
            "index_head_dim": 64,
            "index_n_heads": 2,
            "gated_norm_rank": 4,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "layer_types": ["indexed_attention", "indexed_attention", "indexed_attention"],
        },
    )
)


# Sarvam-MLA and Sarvam-MoE: their own config classes build DeepseekV3ForCausalLM / Glm4MoeForCausalLM (transformers'
# auto mapping); the pruned classes are named after both (MoEPruneDeepseekV3ForCausalLM__SarvamMLAConfig).
register_family(
    MoEAdapter(
        model_type="sarvam_mla",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            **_TINY_13,
            "num_key_value_heads": 2,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
        },
    )
)
register_family(
    MoEAdapter(
        model_type="sarvam_moe",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            **_TINY_13,
            "head_dim": 8,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
        },
    )
)


# -- families new in transformers 5.25 (skipped at registration with an older transformers) --------------------------
# MiniCPM-5-MoE: DeepSeek-V3's router (fp32 sigmoid, e_score_correction_bias, groups), dense leading layers.
register_family(
    MoEAdapter(
        model_type="minicpm5_moe",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            **_TINY_13,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
        },
    )
)

# Param-2 (BharatGen): its own config class on Glm4MoeForCausalLM (as Sarvam-MoE), so GLM-4-MoE's router.
register_family(
    MoEAdapter(
        model_type="param2moe",
        **_DEEPSEEK_V3_ROUTER,
        tiny_config={
            **_TINY_13,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "tie_word_embeddings": False,
        },
    )
)

# Kolibri-1.1: Kolibri-1's router (top-k on logits + bias, sigmoid of the chosen logits) with dense leading layers
# (mlp_only_layers) and indexed sparse attention, some of whose layers read an earlier layer's keys and values.
register_family(
    MoEAdapter(
        model_type="kolibri1_1",
        router_tensors=("weight", "e_score_correction_bias"),
        score_function="sigmoid",
        routing="logit_topk_sigmoid",
        tiny_config={
            **_TINY_13,
            "num_hidden_layers": 4,
            "num_local_experts": 8,
            "norm_topk_prob": True,
            "shared_expert_intermediate_size": 36,
            "mlp_only_layers": [0],
            "mlp_only_intermediate_size": 48,
            "layer_types": ["sliding_attention", "indexed_attention", "sliding_attention", "indexed_attention"],
            "index_num_heads": 1,
            "index_topk": 4,
            "index_pool_size": 16,
            "index_compression": 4,
            "index_num_local_tokens": 4,
            "index_num_sink_tokens": 2,
        },
    )
)

# Ergo (Amazon): fp32 sigmoid router behind a linear (gate.linear.weight), unsorted top-k on score + bias, renormalised
# and x moe_routed_scaling_factor; ungated relu2 experts stored transposed, each with its own RMSNorm scale applied to
# its output (experts.post_expert_norm.weight [experts, hidden], sliced with the expert); dense leading layers.
register_family(
    MoEAdapter(
        model_type="ergo",
        router_tensors=("linear.weight", "e_score_correction_bias"),
        expert_tensors=("up_proj", "down_proj", "post_expert_norm.weight"),
        score_function="sigmoid",
        routing="sigmoid_topk_unsorted_scaled",
        tiny_config={
            **_TINY_13,
            "num_hidden_layers": 4,
            "num_experts": 8,
            "shared_intermediate_size": 24,
            "first_dense_intermediate_size": 48,
            "num_dense_blocks": 1,
            "sliding_window": 8,
            "global_attention_every_n_layers": 2,
        },
    )
)

# Gemma-4 (text model): the decoder layer itself holds the router and the experts, next to a dense MLP that runs in
# parallel; the router returns probabilities of its normalised, scaled input, renormalised over the top-k and x a
# learned per_expert_scale (a per-expert router tensor, so surgery keeps it with its expert).
register_family(
    MoEAdapter(
        model_type="gemma4_text",
        block_attr="",
        router_attr="router",
        router_tensors=("proj.weight", "per_expert_scale"),
        score_function="probabilities",
        routing="softmax_topk_renorm_expert_scale",
        tiny_config={
            **_TINY_13,
            "vocab_size": 128,  # the deep suite (tests/conftest.py FAMILIES) feeds token ids up to 127
            "enable_moe_block": True,
            "num_experts": 8,
            "top_k_experts": 2,
            # no per-layer input embeddings (Gemma-4's small dense models use them): they do not touch the MoE block,
            # and in a model this small they make bf16 / int8 outputs drift far more than in real checkpoints
            "hidden_size_per_layer_input": 0,
            "tie_word_embeddings": False,
            "global_head_dim": 16,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "sliding_window": 16,
        },
    )
)

# Inkling: the router's weight holds the routed experts' rows then n_shared_experts shared experts' rows; the chosen
# routed logits and the shared logits are normalised together (log-sigmoid, softmax over them), so the shared experts'
# weights (the router's fourth output) depend on the choice and the rule reads the router's input to reproduce them.
# The correction bias and the router's first output cover the routed experts only. Pruning keeps the shared rows at
# the end; the router slices them off from the end (-n_shared_experts), which the new routed count does not change.
INKLING_TEXT = register_family(
    MoEAdapter(
        model_type="inkling_text",
        router_tensors=("weight", "e_score_correction_bias"),
        score_function="sigmoid",
        routing="logsigmoid_topk_shared",
        extra_rows_field="n_shared_experts",
        extra_row_tensors=("weight",),
        total_count_attributes=("gate.n_total_experts",),
        tiny_config={
            **_TINY_13,
            "unpadded_vocab_size": 99,
            "swa_num_attention_heads": 2,
            "swa_num_key_value_heads": 2,
            "swa_head_dim": 16,
            "sliding_window_size": 16,
            "d_rel": 4,
            "rel_extent": 16,
            "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding"],
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "route_scale": 2.5,
        },
    )
)

# LongCat-Flash: the router scores n_routed_experts routed experts followed by zero_expert_num zero-computation
# (identity) experts, softmax over all of them, unsorted top-k on probability + e_score_correction_bias, x
# routed_scaling_factor, never renormalised. The MoE block sends an index n_routed_experts + j to zero expert j (an
# identity scaled by its weight) and hands the experts a placeholder routed index with weight 0 for it; the experts
# hold the routed experts only (gate_up_proj and down_proj alike). Pruning keeps the zero experts' router rows (the
# classifier's and the correction bias's) at the end and updates the block's num_routed_experts, from which its index
# arithmetic tells them apart. Each decoder layer holds two attention sublayers and one MoE: num_hidden_layers is
# twice num_layers, the decoder-layer count.
register_family(
    MoEAdapter(
        model_type="longcat_flash",
        num_experts_field="n_routed_experts",
        top_k_field="moe_topk",
        router_attr="router",
        router_tensors=("classifier.weight", "e_score_correction_bias"),
        routing="softmax_topk_biased_scaled",
        extra_rows_field="zero_expert_num",
        extra_row_tensors=("classifier.weight", "e_score_correction_bias"),
        routed_count_attributes=("num_routed_experts",),
        total_count_attributes=("router.n_routed_experts",),
        layers_field="num_layers",
        tiny_config=dict(
            vocab_size=99,
            hidden_size=32,
            num_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            ffn_hidden_size=48,
            expert_ffn_hidden_size=24,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            head_dim=8,
            v_head_dim=8,
            max_position_embeddings=128,
            n_routed_experts=8,
            zero_expert_num=3,
            moe_topk=2,
            routed_scaling_factor=2.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    )
)


# MiniMax-M3-VL's language model: sigmoid scores, unsorted top-k on score + the router's e_score_correction_bias,
# renormalised; routed_scaling_factor scales the block output. Sparse (indexed) attention layers do not touch it.
register_family(
    MoEAdapter(
        model_type="minimax_m3_vl_text",
        router_tensors=("weight", "e_score_correction_bias"),
        score_function="sigmoid",
        routing="sigmoid_topk_unsorted",
        tiny_config={
            **_TINY_13,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "head_dim": 32,
            "num_local_experts": 8,
            "dense_intermediate_size": 64,
            "shared_intermediate_size": 32,
            "routed_scaling_factor": 2.0,
            "rotary_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "index_n_heads": 2,
            "index_head_dim": 16,
            "index_block_size": 8,
            "index_topk_blocks": 4,
            "index_local_blocks": 1,
            "layer_types": ["full_attention", "minimax_m3_sparse", "full_attention"],
        },
    )
)


# AFMoE: sigmoid scores, sorted top-k on score + the MoE block's expert_bias (passed to the router), renormalised,
# x route_scale; the router's projection is a Linear one module deeper (mlp.router.gate.weight).
register_family(
    MoEAdapter(
        model_type="afmoe",
        router_attr="router",
        router_tensors=("gate.weight",),
        block_tensors=("expert_bias",),
        score_function="sigmoid",
        routing="sigmoid_topk_block_bias_sorted",
        tiny_config={
            **_TINY_13,
            "num_experts": 8,
            "num_shared_experts": 1,
            "num_dense_layers": 1,
            "route_scale": 2.5,
            "global_attn_every_n_layers": 2,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    )
)


# PhiMoE: SparseMixer routing (always two experts). The rule reproduces eval mode; in training the stock router samples
# experts with its own gradient estimator and hf_moeprune only observes what it chose (statistics, pruning, saving
# all work); a learned selection bias is refused in training (sparsemixer_eval says why).
register_family(
    MoEAdapter(
        model_type="phimoe",
        router_attr="router",
        routing="sparsemixer_eval",
        tiny_config={
            **_TINY_13,
            "num_local_experts": 8,
            "router_jitter_noise": 0.01,
            "input_jitter_noise": 0.0,
            "hidden_act": "gelu",
            "tie_word_embeddings": False,
        },
    )
)


# Inkling-2 and its looped variant: DeepSeek-V4's top-k router (the config's scoring_func, sigmoid by default, unsorted
# top-k on score + e_score_correction_bias, renormalised, x route_scale).
_INKLING2: dict[str, Any] = dict(
    router_tensors=("weight", "e_score_correction_bias"),
    score_function="sigmoid",
    routing="score_fn_topk",
    tiny_config={
        **_TINY_13,
        "unpadded_vocab_size": 99,
        "swa_num_attention_heads": 2,
        "swa_num_key_value_heads": 2,
        "swa_head_dim": 16,
        "sliding_window_size": 16,
        "d_rel": 4,
        "rel_extent": 16,
        "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding"],
        "n_routed_experts": 8,
        "route_scale": 2.5,
        "n_layers_per_attn_res_block": 3,
    },
)
register_family(MoEAdapter(model_type="inkling2_text", **_INKLING2))
register_family(MoEAdapter(model_type="inkling2_loop_text", **_INKLING2))

# DeepSeek-V4: the top-k ("moe") layers route as Inkling-2 (the router's score_fn, sqrtsoftplus by default). The
# "hash_moe" layers pick each token's experts from a token-id table (DeepseekV4HashRouter.tid2eid, [vocab, top_k]);
# their router weight only weights the picked experts, so removing or reordering an expert there would send tokens to
# other experts: those layers keep all their experts (remapping tid2eid would be exact only while every expert a
# token id names is kept, which no expert-level criterion guarantees). The tiny config has one layer of each
# attention kind (sliding, compressed-sparse with its indexer, heavily compressed) at small compress rates.
DEEPSEEK_V4 = register_family(
    MoEAdapter(
        model_type="deepseek_v4",
        router_tensors=("weight", "e_score_correction_bias"),
        score_function="sigmoid",  # the statistics' per-expert scores; the rule itself applies config.scoring_func
        routing="score_fn_topk",
        keep_all_experts=KeepAllExperts(
            layer_types_field="mlp_layer_types",
            values=("hash_moe",),
            reason="the layer picks experts by token id (router tid2eid table), not by router score; removing or "
            "reordering an expert would re-assign token ids",
            tables=("tid2eid",),
        ),
        tiny_config=_tiny(
            num_hidden_layers=4,
            num_key_value_heads=1,
            head_dim=16,
            q_lora_rank=16,
            moe_intermediate_size=24,
            n_routed_experts=8,
            n_shared_experts=1,
            mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
            layer_types=[
                "sliding_attention",
                "compressed_sparse_attention",
                "heavily_compressed_attention",
                "sliding_attention",
            ],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            hc_mult=2,
            hc_sinkhorn_iters=3,
            sliding_window=8,
            o_groups=2,
            o_lora_rank=8,
            index_n_heads=2,
            index_head_dim=8,
            index_topk=4,
        ),
    )
)


# == Vision-language families (issue 13, multimodal) ===============================================================
# The language model of these is an MoE of a text family's shape; its experts are pruned, the vision tower is kept.
# A registration names only the composite: the sub-config that holds the MoE fields and where the decoder layers
# are (`_multimodal` defaults: ``text_config`` and ``model.language_model.layers``); the router/experts
# declaration is the text family's when that one is registered, else given here. The whole model (vision tower
# included) saves, reloads with AutoModelForImageTextToText, and exports as the stock architecture when uniform.
_TEXT_FIELDS = (
    "num_experts_field", "block_attr", "router_attr", "experts_attr", "router_tensors", "expert_tensors",
    "score_function", "renormalizes", "group_field", "topk_group_field", "group_limited", "group_score_experts",
    "top_k_field", "routing", "block_tensors", "skip_quantization", "extra_rows_field", "extra_row_tensors",
    "routed_count_attributes", "total_count_attributes", "layers_field", "router_output", "experts_call",
)  # fmt: skip
# A vision tower small enough for the tests (Qwen3-VL layout: patches of 4 x 4 x 2 frames, merged 2 x 2).
_QWEN_VISION: dict[str, Any] = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=32,
    num_heads=4,
    out_hidden_size=32,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=16,
)


def _declared(model_type: str) -> MoEAdapter:
    """A family declared above: registered, or recorded in NOT_INSTALLED when this transformers is older than it (a
    composite built on it is new in the same release, so it is recorded there too)."""
    return ADAPTERS.get(model_type) or NOT_INSTALLED[model_type]


def _multimodal(model_type: str, text: MoEAdapter | None = None, **fields: Any) -> MoEAdapter:
    """A vision-language family whose language model's MoE is ``text``'s (a registered text family), or declared by
    ``fields`` (router and experts as for a text family, plus the tiny config)."""
    inherited = {name: getattr(text, name) for name in _TEXT_FIELDS} if text is not None else {}
    defaults = dict(
        text_config_attr="text_config",
        layers_path="model.language_model.layers",
        auto_class="AutoModelForImageTextToText",
    )
    return register_family(MoEAdapter(model_type=model_type, **{**defaults, **inherited, **fields}))


# Qwen3-VL-MoE: Qwen3-MoE's router with the renormalisation always on; interleaved M-RoPE over (t, h, w).
QWEN3_VL_MOE = _multimodal(
    "qwen3_vl_moe",
    tiny_config=dict(
        text_config=dict(
            vocab_size=160,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            max_position_embeddings=256,
            pad_token_id=0,
        ),
        vision_config=dict(_QWEN_VISION, deepstack_visual_indexes=[0]),
        image_token_id=150,
        video_token_id=151,
        vision_start_token_id=152,
        vision_end_token_id=153,
    ),
)

# Qwen3.5-MoE, Qwen4-Exp, dots3: the language model is a registered text family; only the vision tower is added.
# (dots3's vision tower has MoE layers of its own, which are left as they are: only the language model is pruned.)
_multimodal(
    "qwen3_5_moe",
    _declared("qwen3_5_moe_text"),
    tiny_config=dict(
        text_config=dict(
            _declared("qwen3_5_moe_text").tiny_config,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                             "mrope_interleaved": True, "partial_rotary_factor": 0.5},
        ),
        vision_config=_QWEN_VISION,
        image_token_id=95,
        video_token_id=96,
        vision_start_token_id=97,
        vision_end_token_id=98,
    ),
)  # fmt: skip
_multimodal(
    "qwen4_exp",
    _declared("qwen4_exp_text"),
    tiny_config=dict(
        text_config=_declared("qwen4_exp_text").tiny_config,
        vision_config=_QWEN_VISION,
        image_token_id=95,
        video_token_id=96,
        vision_start_token_id=97,
        vision_end_token_id=98,
    ),
)
_multimodal(
    "dots3_note",
    _declared("dots3_note_text"),
    tiny_config=dict(
        text_config=_declared("dots3_note_text").tiny_config,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=2,
            moe_intermediate_size=32,
            spatial_merge_size=2,
            mlp_layer_types=["dense", "sparse"],
            num_local_experts=4,
            num_experts_per_tok=2,
            adapter_in_dim=32,
            adapter_out_dim=32,
            adapter_merge_size=2,
        ),
        audio_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=8,
            max_position_embeddings=32,
            feature_size=8,
            hop_length=4,
            downsample_hidden_size=4,
            adapter_input_size=32,
            adapter_out_dim=32,
            conv_output_size=4,
            samples_per_token=32,
        ),
        image_token_id=120,
        video_token_id=122,
        audio_token_id=121,
    ),
)

# GLM-4.5V / GLM-4.6V (glm4v_moe): GLM-4-MoE's language model (DeepSeek-V3 router, dense first layer), read in its
# text_config; its text family is not a causal LM of its own in transformers, so the router is declared here.
_multimodal(
    "glm4v_moe",
    **_DEEPSEEK_V3_ROUTER,
    tiny_config=dict(
        text_config=dict(
            {k: v for k, v in _tiny(**_SIGMOID_ROUTED).items() if k != "head_dim"},  # not a field here
            vocab_size=160,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                             "partial_rotary_factor": 1.0},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=32, num_heads=4, out_hidden_size=32, patch_size=4, image_size=16,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=150,
        video_token_id=151,
        image_start_token_id=152,
        image_end_token_id=153,
        video_start_token_id=154,
        video_end_token_id=155,
    ),
)  # fmt: skip

# Gemma-4: Gemma-4's language model (router and experts in the decoder layer itself); its vision tower embeds
# per-image patch sequences with (x, y) positions and pools k x k patches into one soft token. No audio tower.
_multimodal(
    "gemma4",
    _declared("gemma4_text"),
    tiny_config=dict(
        text_config=_declared("gemma4_text").tiny_config,
        vision_config=dict(
            hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            head_dim=8, patch_size=4, position_embedding_size=16, pooling_kernel_size=2,
        ),
        boi_token_id=120, eoi_token_id=121, image_token_id=122, video_token_id=123, boa_token_id=124,
        eoa_token_index=125, audio_token_id=126, tie_word_embeddings=False,
    ),
)  # fmt: skip

# Inkling-2 and its looped variant: the language model is the registered text family; the vision tower takes one
# block of merge x merge patches per image token. (The tiny text config does not loop: its loop starts past the last
# layer; tests/test_multimodal.py prunes a looping one.)
_INKLING2_VISION: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, spatial_merge_size=2, posemb_grid_size=8,
    projection_hidden_dim=32, text_hidden_size=32,
)  # fmt: skip
_multimodal(
    "inkling2",
    _declared("inkling2_text"),
    tiny_config=dict(
        text_config=_declared("inkling2_text").tiny_config, vision_config=_INKLING2_VISION, image_token_id=95
    ),
)
_multimodal(
    "inkling2_loop",
    _declared("inkling2_loop_text"),
    tiny_config=dict(
        text_config=_declared("inkling2_loop_text").tiny_config,
        vision_config=dict(_INKLING2_VISION, model_type="inkling2_vision"),
        image_token_id=95,
    ),
)

# MiniMax-M3-VL: the registered text family; a Qwen-VL-style vision tower (flattened t x p x p patches, a (t, h, w)
# grid per image, 2 x 2 merge in the projector).
_multimodal(
    "minimax_m3_vl",
    _declared("minimax_m3_vl_text"),
    tiny_config=dict(
        text_config=_declared("minimax_m3_vl_text").tiny_config,
        vision_config=dict(
            hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
            temporal_patch_size=2, spatial_merge_size=2, image_size=16,
        ),
        image_token_index=95,
        video_token_index=96,
        projector_hidden_size=32,
    ),
)  # fmt: skip

# Inkling (inkling_mm_model): the inkling_text language model at model.language_model, a vision tower that turns each
# patch ([temporal, height, width, channels]) into one placeholder token's embedding, and an audio tower.
_multimodal(
    "inkling_mm_model",
    INKLING_TEXT,
    tiny_config=dict(
        text_config=dict(INKLING_TEXT.tiny_config),
        vision_config=dict(patch_size=4, temporal_patch_size=2, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2),
        audio_config=dict(n_mel_bins=8, mel_vocab_size=16),
        image_token_id=95,
        audio_token_id=96,
        image_bos_token_id=97,
        audio_bos_token_id=98,
    ),
)  # fmt: skip

# Mistral-Small-4 (mistral4): a text-only MoE (Mistral4ForCausalLM, DeepSeek-V3's layout with MLA attention) that
# transformers reaches only through AutoModelForImageTextToText. Its router is DeepSeek-V3's group-limited one on
# softmax probabilities (no correction bias); the tiny config uses 2 groups and a scale so that only that rule fits.
_MISTRAL4_TEXT: dict[str, Any] = dict(
    _tiny(
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.0,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=4,
    ),
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                     "llama_4_scaling_beta": 0.1},
)  # fmt: skip
_MISTRAL4_ROUTER: dict[str, Any] = dict(
    routing="softmax_group_limited", group_field="n_group", topk_group_field="topk_group"
)
register_family(
    MoEAdapter(
        model_type="mistral4",
        auto_class="AutoModelForImageTextToText",
        **_MISTRAL4_ROUTER,
        tiny_config=_MISTRAL4_TEXT,
    )
)

# Mistral-Large-4: Mistral-Small-4's router in fp32 with the renormalisation always on (the router has no
# norm_topk_prob), on a DeepSeek-V3.2-style language model (indexed sparse attention, MLA without q-LoRA) behind a
# Pixtral vision tower.
_multimodal(
    "mistral_large4",
    **_MISTRAL4_ROUTER,
    renormalizes=lambda config: True,
    tiny_config=dict(
        text_config=dict(
            {k: v for k, v in _MISTRAL4_TEXT.items() if k not in ("q_lora_rank", "norm_topk_prob")},
            index_topk=4,  # below the test sequences' length, so the indexer does select
            index_head_dim=16,
            index_n_heads=2,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
                             "attention_factor": 1.0},
        ),
        vision_config=dict(
            model_type="pixtral", hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            head_dim=16, patch_size=4, image_size=16, hidden_act="silu",
        ),
        image_token_index=100,
    ),
)  # fmt: skip

# Qwen3-Omni-MoE's thinker (text, vision and audio in, text out): Qwen3-MoE's language model and router behind a
# Qwen3-VL vision tower and a Whisper-style audio encoder. (The talker, which turns the thinker's states into speech, is
# a model of its own with another MoE: qwen3_omni_moe_talker is not an image-text-to-text family.)
_multimodal(
    "qwen3_omni_moe_thinker",
    routing=QWEN3_MOE.routing,  # the count field is num_experts here (Qwen3-MoE's config reads num_local_experts)
    tiny_config=dict(
        text_config=dict(
            vocab_size=160, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            max_position_embeddings=256, pad_token_id=0,
        ),
        vision_config=dict(_QWEN_VISION, deepstack_visual_indexes=[0]),
        audio_config=dict(
            num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32,
            output_dim=32, max_source_positions=32, n_window=4, n_window_infer=8, downsample_hidden_size=8,
        ),
        image_token_id=150,
        video_token_id=151,
        audio_token_id=152,
        audio_start_token_id=153,
        user_token_id=154,
        # not a field of the thinker's config class, but its generate() reads it (get_rope_index raises without it)
        vision_start_token_id=155,
    ),
)  # fmt: skip

# GLM-5.3-Flash (glm5_next): DeepSeek-V3's router on a language model of KDA linear attention and indexed (DSA)
# attention layers with hyper-connections (hc_mult residual streams), behind a GLM-OCR-style vision tower.
_multimodal(
    "glm5_next",
    **_DEEPSEEK_V3_ROUTER,
    tiny_config=dict(
        text_config=dict(
            vocab_size=160, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=0, v_head_dim=16,
            index_topk=4, index_kpool=2, index_head_dim=8, index_n_heads=2,  # index_topk below the test sequences
            linear_head_dim=8, linear_num_heads=2, hc_mult=2, hc_sinkhorn_iters=3,
            mlp_layer_types=["dense", "sparse", "sparse"],
            layer_types=["linear_attention", "indexed_attention", "linear_attention"],
            max_position_embeddings=256, pad_token_id=0,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4, image_size=16,
            spatial_merge_size=2, temporal_patch_size=2, projection_intermediate_size=32,
        ),
        image_token_id=150,
        video_token_id=151,
        image_start_token_id=152,
        image_end_token_id=153,
        video_start_token_id=154,
        video_end_token_id=155,
    ),
)  # fmt: skip

# Hy4 vision-language (hy_v4_vl): HY-V4's language model (DeepSeek-V3 router, DSA attention, iHC) with M-RoPE over
# (t, h, w), behind a HunYuan-VL vision tower.
_multimodal(
    "hy_v4_vl",
    _declared("hy_v4"),
    tiny_config=dict(
        text_config=dict(
            _declared("hy_v4").tiny_config,
            vocab_size=160,
            # the three sections cover qk_rope_head_dim // 2 frequencies
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 0, 1]},
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, out_hidden_size=32,
            patch_size=4, spatial_merge_size=2, max_image_size=16,
        ),
        image_token_id=150,
        video_token_id=151,
    ),
)  # fmt: skip

# Aria: aria_text's language model and router, behind an Idefics3 vision tower and a cross-attention projector.
_multimodal(
    "aria",
    _declared("aria_text"),
    tiny_config=dict(
        text_config=_declared("aria_text").tiny_config,
        vision_config=dict(
            model_type="idefics3_vision", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, patch_size=4, image_size=16,
        ),
        projector_patch_to_query_dict={16: 4},  # a 16 x 16 image of 4 x 4 patches -> 4 queries
        image_token_index=98,
    ),
)  # fmt: skip

# DeepSeek-OCR-2: DeepSeek-V2's router (fp32 softmax, greedy or group-limited greedy top-k, never renormalised,
# x routed_scaling_factor) on an MHA language model, behind a SAM encoder and a Qwen2-style query encoder. The tiny
# config routes group-limited and scaled, so that no other rule reproduces it.
_multimodal(
    "deepseek_ocr2",
    DEEPSEEK_V2,
    tiny_config=dict(
        text_config=dict(
            vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=2.0,
            mlp_layer_types=["dense", "sparse", "sparse"], max_position_embeddings=128, pad_token_id=0,
        ),
        vision_config=dict(
            sam_config=dict(
                hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                initializer_range=0.02,  # the class default (1e-10) leaves a random SAM blind to the image
                patch_size=16, window_size=2, global_attn_indexes=[1], downsample_channels=[16, 32],
            ),
            encoder_config=dict(
                vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2,
            ),
        ),
        image_token_id=100,
    ),
)  # fmt: skip

# Unlimited-OCR: DeepSeek-OCR-2's language model (DeepSeek-V2 router) with reference sliding-window attention (every
# token also sees the image and prompt tokens), behind a SAM encoder and a CLIP encoder.
_multimodal(
    "unlimited_ocr",
    DEEPSEEK_V2,
    tiny_config=dict(
        text_config=dict(
            _declared("deepseek_ocr2").tiny_config["text_config"],
            sliding_window=4,  # below the test sequences' length
        ),
        vision_config=dict(
            sam_config=dict(
                hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                initializer_range=0.02,  # the class default (1e-10) leaves a random SAM blind to the image
                patch_size=16, window_size=2, global_attn_indexes=[1], downsample_channels=[16, 32], mlp_dim=32,
            ),
            encoder_config=dict(
                hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                patch_size=4,
            ),
        ),
        image_token_id=100,
    ),
)  # fmt: skip

# Muse-Spark: the MoE block pools hidden_size down to moe_hidden_size before the routed experts (which run at that
# width, each followed by a shared post-expert norm) and back up after; the router reads the full hidden state:
# fp32 logits x output_multiplier, sigmoid, e_score_correction_bias on the choice, x routed_scaling_factor (2 in the
# tiny config, so that only its rule fits). Vision and audio towers are kept.
_multimodal(
    "muse_spark",
    router_tensors=("weight", "e_score_correction_bias"),
    score_function="sigmoid",
    routing="sigmoid_topk_unsorted_scaled",
    tiny_config=dict(
        text_config=dict(
            vocab_size=160, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, moe_hidden_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=8,
            num_experts_per_tok=2, routed_scaling_factor=2.0, mlp_layer_types=["dense", "sparse", "sparse"],
            sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(
            patch_size=4, pos_emb_height=4, pos_emb_width=4, num_attention_heads=2, num_hidden_layers=1, hidden_size=32,
            intermediate_size=32, max_position_embeddings=16,
        ),
        audio_config=dict(
            patch_sizes=[4, 2], hidden_sizes=[8, 16], depths=[1, 1], num_hidden_layers=2, out_hidden_size=32,
        ),
        image_token_id=150,
        video_token_id=151,
        audio_token_id=152,
        out_hidden_size=128,  # the vision tower's width x its 2 x 2 merge
        projector_hidden_size=32,
    ),
)  # fmt: skip

# Llama 4 (Scout, Maverick as released): the llama4_text language model under language_model.model.layers, a vision
# tower whose pixel-shuffled patches (16 patches of a 16 x 16 image -> 4 image tokens) are projected into it.
_multimodal(
    "llama4",
    _declared("llama4_text"),
    layers_path="language_model.model.layers",
    tiny_config=dict(
        text_config=_declared("llama4_text").tiny_config,
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,  # = hidden_size / pixel_shuffle_ratio**2: the projector MLP reads shuffled patches
            image_size=16,
            patch_size=4,
            pixel_shuffle_ratio=0.5,
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
        ),
        image_token_index=95,
        boi_token_index=96,
        eoi_token_index=97,
    ),
)

# == end of the vision-language families ==========================================================================

# -- MoE families hf_moeprune does not prune yet, and why -------------------------------------------------------------
for _model_type, _reason in {
    "jetmoe": (
        "no v5 experts module: the MLP experts are split over two JetMoeParallelExperts modules (mlp.input_linear, "
        "mlp.output_linear) called with their own dispatch, and the attention is itself a mixture of experts (MoA) "
        "with a second router; adapters name one experts module called as experts(hidden, top_k_index, top_k_weights)"
    ),
    "doge": (
        "product-key routing: the router scores sqrt(E) x sqrt(E) key pairs and an expert's id is its cell in the grid "
        "(experts are rows of up/down embeddings), so removing one expert renumbers the others; there is no "
        "[experts, hidden] router"
    ),
    "zaya": (
        "its router is an MLP over a router state carried from the previous layer (ZayaRouter(hidden_states, "
        "router_states): down_proj, + router_states x router_states_scale, then router_mlp's norm/fc1/fc2/out_proj), "
        "not an [experts, hidden] projection of the hidden states that discovery and the routing rules take a router "
        "to be; and its skip slot (row num_experts of router_mlp.out_proj and of balancing_biases) is recognised by "
        "comparing the chosen index with config.num_experts, the global count that all layers share, then returned "
        "as expert 0 with weight 0: a layer pruned narrower than the widest would not recognise its own skip slot, "
        "and the router's indices cannot tell a skip from a route to expert 0 for the statistics"
    ),
}.items():
    register_unsupported(_model_type, _reason)


# -- vision-language MoE families hf_moeprune does not prune yet, and why (issue 13, multimodal) ---------------------
def _text_unsupported(text: str) -> str:
    if text in UNSUPPORTED:
        return f"its language model ({text}) is not supported: {UNSUPPORTED[text]}"
    return f"its language model ({text}) is supported, but this composite's tiny config and layout are not verified yet"


for _model_type, _reason in {
    "ernie4_5_vl_moe": (
        "each MoE layer of its language model holds two expert sets (text_moe and vision_moe, chosen per token by "
        "modality, moe_num_experts=[text, vision]); one expert count per layer cannot describe them"
    ),
    "step3p7": "no v5 experts module with fused 3D tensors in its language model (checked with adapters.discovery)",
    "diffusion_gemma": (
        "its Gemma-4 MoE layers exist twice, as model.encoder.language_model.layers (the prompt encoder) and "
        "model.decoder.layers (the block-diffusion denoiser), the same router and expert tensors tied between them "
        "(DiffusionGemmaModel._tied_weights_keys): an adapter names one layers path, and surgery replaces one tree's "
        "per-expert tensors, which unties them and leaves the other tree with every expert; its logits are the "
        "denoised canvas's and it generates by block diffusion, not token by token"
    ),
}.items():
    if _model_type not in UNSUPPORTED and _model_type not in ADAPTERS:
        register_unsupported(_model_type, _reason)
