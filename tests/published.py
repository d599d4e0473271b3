"""Shapes of published checkpoints, one per family, from their config.json (the weights are never
needed): tests and benchmarks build random models at these shapes with fewer layers."""

from __future__ import annotations

from typing import Any

from helpers import longrope

PUBLISHED: dict[str, dict[str, Any]] = {
    "Llama-3.2-1B": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        vocab_size=128256,
    ),
    "Mistral-7B-v0.3": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        sliding_window=None,
        vocab_size=32768,
    ),
    "Qwen2.5-1.5B": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
    "Qwen3-4B": dict(
        model_type="qwen3",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
    "Phi-4-mini": dict(
        model_type="phi3",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=24,
        num_key_value_heads=8,
        partial_rotary_factor=0.75,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=longrope(48),
        original_max_position_embeddings=4096,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        vocab_size=200064,
    ),
    "Gemma-2-2B": dict(
        model_type="gemma2",
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        sliding_window=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        vocab_size=256000,
    ),
    "Gemma-3-4B": dict(
        model_type="gemma3_text",
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        vocab_size=262208,
    ),
    "Qwen3-30B-A3B": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        vocab_size=151936,
    ),
    "Mixtral-8x7B": dict(
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        vocab_size=32000,
    ),
}


def reduced(name: str, layers: int = 2, vocab: int | None = None, experts: int | None = None) -> dict[str, Any]:
    """A published config with fewer layers (Gemma's pattern kept: a sliding and a global layer),
    and optionally a smaller vocabulary and fewer experts (top-k kept where it fits)."""
    config = dict(PUBLISHED[name], num_hidden_layers=layers)
    if config["model_type"] in ("gemma2", "gemma3_text"):
        config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if vocab:
        config["vocab_size"] = vocab
    if experts:
        key = "num_local_experts" if "num_local_experts" in config else "num_experts"
        config[key] = experts
        config["num_experts_per_tok"] = min(config["num_experts_per_tok"], experts)
    return config
