"""The Llama-family config: one dataclass for Llama, SmolLM, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and 3,
and the mixtures of experts Qwen3-MoE and Mixtral.

It reads and writes the Hugging Face `config.json` keys, so a saved folder loads in transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tuili.errors import ModelFormatError

# model_type -> the transformers class that reads the same checkpoint.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",  # Qwen2's layout without q/k/v bias, with an RMSNorm on each head's q and k
    "phi3": "Phi3ForCausalLM",  # Llama's computation, q/k/v and gate/up stored fused (tuili.models.families)
    # (1 + w) RMSNorms (stored as w: tuili.models.families), norms after attention and MLP too, the
    # embedding scaled by √hidden, query_pre_attn_scalar, sliding-window and global layers alternating
    "gemma2": "Gemma2ForCausalLM",  # + attention and final logit soft-capping
    "gemma3_text": "Gemma3ForCausalLM",  # + q/k norms, local layers' own RoPE base
    # top-k mixtures of experts: a router picks experts_per_token gated MLPs for each token
    "qwen3_moe": "Qwen3MoeForCausalLM",  # Qwen3's attention; experts in every decoder_sparse_step-th layer
    "mixtral": "MixtralForCausalLM",  # Mistral's attention; experts stored as w1/w2/w3 (tuili.models.families)
}
MOE = ("qwen3_moe", "mixtral")
GEMMA = ("gemma2", "gemma3_text")
GEMMA_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer global when config.json has no layer_types
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
ROPE_KEYS = {  # what each type needs (original_max_position_embeddings may also sit at the top level)
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
# hidden_act values tuili computes (transformers' ACT2FN names); another is refused, never replaced by SiLU
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
# config.json keys of other families that change what the model computes: refused unless neutral
FOREIGN = {
    "final_logit_softcapping": (None,),
    "attn_logit_softcapping": (None,),
    "query_pre_attn_scalar": (None,),
    "partial_rotary_factor": (None, 1, 1.0),
    "num_experts": (None, 0),
    "num_local_experts": (None, 0),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
    "logits_scaling": (None, 1, 1.0),
    "use_qk_norm": (None, False),
    "qk_layernorm": (None, False),
    "pretraining_tp": (None, 1),
    "use_bidirectional_attention": (None, False),
}
FAMILY_KEYS = {  # FOREIGN keys a family computes
    "gemma2": ("final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"),
    "gemma3_text": ("final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"),
    "phi3": ("partial_rotary_factor",),  # Phi-4-mini rotates 3/4 of each head
    "qwen3_moe": ("num_experts", "num_local_experts"),  # transformers writes both names
    "mixtral": ("num_experts", "num_local_experts"),
}
KV_CACHE_DTYPES = (None, "float32", "bfloat16", "int8")  # what tuili's caches and kernels store


@dataclass
class LlamaConfig:
    """Shapes and constants of a Llama-family decoder (HF key names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 0  # 0 (or None): as many as attention heads
    head_dim: int = 0  # 0 (or None): hidden_size / num_attention_heads
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"  # the MLP's activation: activation(gate) · up
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (Qwen2 always has it)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # what a KV cache stores ("bfloat16", "int8"; None: the model's dtype). tuili's own key, set by
    # tuili.quant.quantize_kv_cache_ and saved in config.json; transformers ignores it
    kv_cache_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ModelFormatError(
                f"unsupported architecture {self.model_type!r}: tuili runs "
                f"{', '.join(sorted(ARCHITECTURES))} (Llama-family decoders)"
            )
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ModelFormatError(
                f"unsupported kv_cache_dtype {self.kv_cache_dtype!r}: choose one of "
                f"{', '.join(d for d in KV_CACHE_DTYPES if d)} (or leave it out)"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ModelFormatError(
                f"unsupported hidden_act {self.hidden_act!r}: tuili computes {', '.join(ACTIVATIONS)} "
                "(another activation would give wrong logits, so the model is refused)"
            )
        computed = FAMILY_KEYS.get(self.model_type, ())
        foreign = [
            f"{k}={v!r}" for k, v in self.extra.items() if k in FOREIGN and v not in FOREIGN[k] and k not in computed
        ]
        if foreign:
            raise ModelFormatError(
                f"config.json sets {', '.join(foreign)}, which tuili's {self.model_type} model does not "
                "compute; tuili refuses the model rather than give wrong logits"
            )
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ModelFormatError(
                f"unsupported rope_scaling type {rope_type!r}: tuili supports {', '.join(ROPE_TYPES)}"
            )
        scaling = self.rope_parameters
        lacking = [k for k in ROPE_KEYS.get(rope_type, ()) if scaling.get(k) is None]
        if lacking:
            raise ModelFormatError(f"rope_scaling of type {rope_type!r} needs {', '.join(lacking)}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ModelFormatError(
                f"partial_rotary_factor={self.extra.get('partial_rotary_factor')} rotates {self.rotary_dim} of a "
                f"head's {self.head_dim} values; RoPE needs an even number, at least 2"
            )
        for key in ("short_factor", "long_factor"):
            if key in scaling and len(scaling[key]) != self.rotary_dim // 2:
                raise ModelFormatError(
                    f"rope_scaling.{key} has {len(scaling[key])} entries; rotating {self.rotary_dim} values of a "
                    f"head needs {self.rotary_dim // 2}"
                )

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    @property
    def rotary_dim(self) -> int:
        """How many of each head's values RoPE rotates (the first ones): head_dim × partial_rotary_factor
        (Phi-4-mini: 0.75); the rest pass unrotated, as in transformers' Phi-3."""
        return int(self.head_dim * float(self.extra.get("partial_rotary_factor") or 1.0))

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """rope_scaling with the top-level original_max_position_embeddings (Phi-3 keeps it there)."""
        out = {"original_max_position_embeddings": self.extra.get("original_max_position_embeddings")}
        out.update({k: v for k, v in (self.rope_scaling or {}).items() if v is not None})
        return out

    @property
    def o_proj_bias(self) -> bool:
        """Llama's and Qwen3's attention_bias also covers o_proj; Qwen2's q/k/v bias does not."""
        return self.model_type in ("llama", "qwen3") and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Each head's q and k go through an RMSNorm (over head_dim) before RoPE (Qwen3, Gemma 3)."""
        return self.model_type in ("qwen3", "gemma3_text", "qwen3_moe")

    @property
    def num_experts(self) -> int:
        """Experts of each sparse layer (0: a dense model)."""
        if self.model_type not in MOE:
            return 0
        counts = {self.extra[k] for k in ("num_experts", "num_local_experts") if self.extra.get(k)}
        if len(counts) > 1:
            raise ModelFormatError(f"config.json gives two numbers of experts: {sorted(counts)}")
        return int(counts.pop()) if counts else 0

    @property
    def experts_per_token(self) -> int:
        return int(self.extra.get("num_experts_per_tok") or 2)

    @property
    def expert_intermediate_size(self) -> int:
        """Each expert's MLP width (Qwen3-MoE: moe_intermediate_size; Mixtral: intermediate_size)."""
        return int(self.extra.get("moe_intermediate_size") or self.intermediate_size)

    @property
    def norm_topk_prob(self) -> bool:
        """The chosen experts' probabilities renormalized to sum to 1 (always in Mixtral)."""
        return self.model_type == "mixtral" or bool(self.extra.get("norm_topk_prob", False))

    def sparse_layer(self, layer: int) -> bool:
        """Whether a decoder layer's MLP is a mixture of experts (Qwen3-MoE: decoder_sparse_step, mlp_only_layers)."""
        if not self.num_experts:
            return False
        step = int(self.extra.get("decoder_sparse_step") or 1)
        return layer not in (self.extra.get("mlp_only_layers") or []) and (layer + 1) % step == 0

    @property
    def output_norms(self) -> bool:
        """The attention's and the MLP's outputs go through an RMSNorm before the residual add (Gemma)."""
        return self.model_type in GEMMA

    @property
    def embed_scale(self) -> float | None:
        """What the embeddings are multiplied by (Gemma: √hidden_size), None for 1."""
        return self.hidden_size**0.5 if self.model_type in GEMMA else None

    @property
    def attention_scale(self) -> float:
        """The factor on q·k: query_pre_attn_scalar^-½ (Gemma), head_dim^-½ otherwise."""
        return (self.extra.get("query_pre_attn_scalar") or self.head_dim) ** -0.5

    @property
    def attn_softcap(self) -> float | None:
        """Attention scores become cap · tanh(score / cap) (Gemma 2), None: no cap."""
        return self.extra.get("attn_logit_softcapping")

    @property
    def final_softcap(self) -> float | None:
        """Logits become cap · tanh(logit / cap) (Gemma 2), None: no cap."""
        return self.extra.get("final_logit_softcapping")

    @property
    def layer_types(self) -> list[str]:
        """Each layer's attention: "sliding_attention" (within sliding_window) or "full_attention"."""
        if self.model_type not in GEMMA:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            return [kind] * self.num_hidden_layers
        if self.extra.get("layer_types"):
            return list(self.extra["layer_types"])
        n = self.extra.get("sliding_window_pattern") or GEMMA_PATTERN[self.model_type]
        return ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(self.num_hidden_layers)]

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer's attention (None: it sees every earlier token)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def local_rope_theta(self) -> float | None:
        """Gemma 3's sliding-window layers rotate with their own base (default RoPE); None: one RoPE."""
        if self.model_type != "gemma3_text":
            return None
        return float(self.extra.get("rope_local_base_freq") or 10000.0)

    @property
    def num_query_groups(self) -> int:
        """Query heads that share one KV head (GQA; 1 is plain multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x keys)."""
        data = dict(data)
        model_type = data.get("model_type")
        if model_type is None:
            raise ModelFormatError("config.json has no 'model_type'")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters (Gemma 3: one per layer type).
        rope = data.pop("rope_parameters", None)
        if rope and "full_attention" in rope:
            local = rope.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise ModelFormatError(
                    f"rope_parameters.sliding_attention {local}: tuili rotates local layers by default RoPE"
                )
            data.setdefault("rope_local_base_freq", local.get("rope_theta"))
            rope = rope["full_attention"]
        if rope:
            rope = dict(rope)
            data.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if "partial_rotary_factor" in rope:  # kept at the top level, as config.json writes it
                data.setdefault("partial_rotary_factor", rope.pop("partial_rotary_factor"))
            if rope.get("rope_type", "default") != "default":
                data.setdefault("rope_scaling", rope)
        scaling = data.get("rope_scaling")
        if scaling and "partial_rotary_factor" in scaling:
            scaling = data["rope_scaling"] = dict(scaling)
            data.setdefault("partial_rotary_factor", scaling.pop("partial_rotary_factor"))
        if model_type == "phi3" and scaling and scaling.get("rope_type", scaling.get("type")) in ("su", "yarn"):
            data["rope_scaling"] = {**scaling, "rope_type": "longrope"}  # Phi-3's early names for LongRoPE
            data["rope_scaling"].pop("type", None)
        if model_type in GEMMA:
            data["hidden_act"] = data.pop("hidden_activation", None) or data.get("hidden_act") or "gelu_pytorch_tanh"
        if data.get("torch_dtype") is None:
            data["torch_dtype"] = data.get("dtype") or "float32"
        if model_type in ("mistral", "qwen2", "qwen3", "phi3", *GEMMA, *MOE):
            if model_type in ("qwen2", "qwen3", "qwen3_moe") and not data.get("use_sliding_window", False):
                data["sliding_window"] = None
        else:
            data["sliding_window"] = None
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in known
        ]
        if missing:
            raise ModelFormatError(f"config.json lacks {', '.join(missing)}")
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict that transformers reads back."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        stale = ("architectures", "dtype", "rope_parameters", "transformers_version")
        out.update({k: v for k, v in self.extra.items() if k not in stale})
        out["architectures"] = [self.architecture]
        if self.sliding_window is None:
            out.pop("sliding_window")
        if self.kv_cache_dtype is None:
            out.pop("kv_cache_dtype")
        if self.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            out["use_sliding_window"] = self.sliding_window is not None
        if self.model_type in GEMMA:
            out["hidden_activation"] = out.pop("hidden_act")
            out["layer_types"] = self.layer_types
        return out

    def num_parameters(self) -> int:
        """Parameters implied by the shapes (tied embeddings counted once)."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        qkv = h * d * (self.num_attention_heads + 2 * self.num_key_value_heads)
        if self.attention_bias:
            qkv += d * (self.num_attention_heads + 2 * self.num_key_value_heads)
        attn = qkv + self.num_attention_heads * d * h + (h if self.o_proj_bias else 0) + (2 * d if self.qk_norm else 0)
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        moe = self.num_experts * 3 * h * self.expert_intermediate_size + self.num_experts * h  # experts, router
        norms = (4 if self.output_norms else 2) * h
        layers = sum(attn + norms + (moe if self.sparse_layer(n) else mlp) for n in range(self.num_hidden_layers))
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers + embed + h
