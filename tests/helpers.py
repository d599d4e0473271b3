"""Tiny random models and a byte-level tokenizer, so unit tests run in seconds and offline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from tuili.models import LlamaConfig
from tuili.models.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Every architecture and option tuili claims, as tiny configs (vocab = 256 bytes + 3 specials).
TINY = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    eos_token_id=2,
    bos_token_id=1,
)


def longrope(pairs: int) -> dict:
    """LongRoPE scaling with distinct short and long factors for `pairs` rotated value pairs."""
    return {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(pairs)],
        "long_factor": [1.0 + 0.9 * i for i in range(pairs)],
    }


GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, tie_word_embeddings=True)  # both Gemmas
CONFIGS = {
    "llama-gqa": dict(model_type="llama"),
    "llama-mha-untied-bias": dict(model_type="llama", num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "llama-mqa-tied": dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True),
    "llama-rope-linear": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-rope-llama3": dict(
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama-rope-yarn": dict(
        model_type="llama",
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "llama-rope-dynamic": dict(model_type="llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "phi3": dict(model_type="phi3", sliding_window=24),
    "phi3-longrope": dict(
        model_type="phi3",
        head_dim=16,
        max_position_embeddings=1024,
        original_max_position_embeddings=64,
        rope_scaling=longrope(8),
    ),
    "phi4-mini": dict(  # partial rotary: RoPE on the first 3/4 of each head, LongRoPE, tied head
        model_type="phi3",
        head_dim=16,
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        original_max_position_embeddings=64,
        rope_scaling=longrope(6),  # 12 of 16 values rotated
    ),
    "gemma2": dict(
        **GEMMA,
        model_type="gemma2",
        attn_logit_softcapping=2.0,  # small caps, so that tanh bends on tiny random weights
        final_logit_softcapping=3.0,
    ),
    "gemma3": dict(
        **GEMMA,
        model_type="gemma3_text",
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        layer_types=["sliding_attention", "full_attention"],
    ),
    "qwen3-moe": dict(
        model_type="qwen3_moe",
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],  # one dense layer, one of experts
    ),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
    "mistral-sliding": dict(model_type="mistral", sliding_window=8, head_dim=24),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "llama-gelu": dict(model_type="llama", hidden_act="gelu"),
    "llama-gelu-tanh": dict(model_type="llama", hidden_act="gelu_pytorch_tanh", mlp_bias=True),
}


def tiny_config(name: str = "llama-gqa", **overrides) -> LlamaConfig:
    return LlamaConfig.from_hf({**TINY, **CONFIGS[name], **overrides})


def tiny_tokenizer() -> Tokenizer:
    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    return Tokenizer(backend, CHAT_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>")


def save_hf_tiny(name: str, folder: Path, seed: int = 0):
    """A random transformers model of a tiny config, saved with a tokenizer; returns the HF model."""
    return save_hf(tiny_config(name), folder, seed)


def save_hf(config: LlamaConfig, folder: Path, seed: int = 0):
    """A random transformers model of `config`, saved with the tiny tokenizer; returns the HF model."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(
        hf_config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them so they are tested
        for name_, p in hf.named_parameters():
            if "norm" in name_ or name_.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(folder)
    tiny_tokenizer().save(Path(folder))
    return hf


def random_tiny(name: str = "llama-gqa", seed: int = 0, **overrides):
    """tuili Model with random weights for a tiny config (no transformers needed)."""
    from tuili.models import LlamaForCausalLM, Model

    torch.manual_seed(seed)
    config = tiny_config(name, **overrides)
    module = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return Model(module, tiny_tokenizer(), config, f"random:{name}")
