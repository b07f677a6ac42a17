"""Tiny randomly initialised MoE models of every supported family, for tests, examples and demos.

Nothing is downloaded: the configs are built here with a few hundred thousand parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from hf_moeprune.adapters import get_adapter

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

# GLM-4-MoE and dots1 share DeepSeek-V3's MoE block (sigmoid router with correction bias, shared experts,
# dense first layer) with standard attention.
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

# model_type -> (config class, extra fields). Expert counts use each family's own field name.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=8)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            num_experts=8,
            norm_topk_prob=True,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8, norm_topk_prob=True, head_dim=8),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=8, norm_topk_prob=True)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
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
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            intermediate_size=24,
            num_local_experts=8,
            head_dim=8,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    "minimax": (
        "MiniMaxConfig",
        dict(
            intermediate_size=48,
            num_local_experts=8,
            head_dim=8,
            block_size=16,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
    ),
    "flex_olmo": ("FlexOlmoConfig", dict(intermediate_size=24, num_experts=8, norm_topk_prob=True)),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
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
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(_SIGMOID_ROUTED),
    ),
    "dots1": (
        "Dots1Config",
        dict(_SIGMOID_ROUTED),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=48, num_local_experts=8)),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
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
    ),
    # MoE feed-forward in layers 0 and 2 (layer 1 is dense); attention in layer 2, Mamba (torch path) in 0 and 1
    "jamba": (
        "JambaConfig",
        dict(
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
    ),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=48, num_experts=8, moe_topk=2, head_dim=8)),
}


def tiny_config(model_type: str, **overrides: Any) -> transformers.PreTrainedConfig:
    """A tiny config of ``model_type``; ``overrides`` replace any field."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for model_type {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    class_name, extra = TINY_CONFIGS[model_type]
    fields = {**_COMMON, **extra, **overrides}
    return getattr(transformers, class_name)(**fields)


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A tiny randomly initialised causal LM of ``model_type`` in eval mode, deterministic per seed."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if model_type == "gpt_oss":
        # GPT-OSS initialises router and expert biases to zero; random ones exercise their surgery.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias") and ".mlp." in name:
                    param.normal_(0.0, 0.5)
    if get_adapter(config).has_native_selection_bias:
        # DeepSeek-V3-style correction biases initialise to zero; random ones exercise the biased choice.
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.normal_(0.0, 0.1)
    return model.eval()
