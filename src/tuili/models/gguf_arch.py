"""How each family is stored in GGUF: llama.cpp's architecture, its tensor names, its fixed choices.

One table, read both ways: by the reader (tuili.models.gguf) and the writer
(tuili.pipeline.gguf_export). Names map a GGUF tensor to the family's own stored (Hugging Face)
name, so that the family's renaming and fusing (tuili.models.families) apply to GGUF files too.
A mixture's experts are one 3-D GGUF tensor per projection (experts × rows × columns); their
stored names carry `{e}` for the expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3, Gemma 3
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3, split on load (tuili.models.families)
}
ROPE_FACTORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}  # Phi-3
ROPE_FREQS = "rope_freqs.weight"  # llama's per-frequency divisors (Llama 3's RoPE scaling): θ_i / f_i
EXPERT = "{e}"  # an expert's index in a stored name


def _experts(prefix: str, gate: str, up: str, down: str) -> dict[str, str]:
    return {
        "ffn_gate_inp": f"{prefix}.gate",  # the router
        "ffn_gate_exps": f"{prefix}.experts.{EXPERT}.{gate}",
        "ffn_up_exps": f"{prefix}.experts.{EXPERT}.{up}",
        "ffn_down_exps": f"{prefix}.experts.{EXPERT}.{down}",
    }


_GEMMA_NORMS = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


@dataclass(frozen=True)
class GGUFArch:
    """llama.cpp's graph for one family and what it fixes that a config may vary."""

    name: str  # general.architecture
    names: dict[str, str] = field(default_factory=dict)  # GGUF name -> stored name, beyond PER_LAYER
    permute_qk: bool = False  # q and k rows interleaved for llama.cpp's RoPE (its llama graph)
    large_layers: int = 0  # Gemma's graphs: q scaled by (hidden / heads)^-½ at this depth, else head_dim^-½

    def layer_names(self) -> dict[str, str]:
        return {**PER_LAYER, **self.names}

    @property
    def gemma(self) -> bool:
        """A Gemma graph: it reads soft caps, a layer pattern and a local RoPE base, and honours
        sliding windows (llama.cpp's other graphs attend to every key)."""
        return self.large_layers > 0

    def query_scalar(self, hidden: int, heads: int, layers: int, head_dim: int) -> int:
        """The query_pre_attn_scalar llama.cpp's Gemma graph derives from the shapes (it reads none)."""
        return hidden // heads if layers == self.large_layers else head_dim


ARCHS: dict[str, GGUFArch] = {  # tuili model_type -> its GGUF architecture
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),
    "mixtral": GGUFArch("llama", _experts("block_sparse_moe", "w1", "w3", "w2"), permute_qk=True),
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3"),
    "qwen3_moe": GGUFArch("qwen3moe", _experts("mlp", "gate_proj", "up_proj", "down_proj")),
    "phi3": GGUFArch("phi3", {"ffn_up": "mlp.gate_up_proj"}),  # Phi-3's ffn_up holds gate and up
    "gemma2": GGUFArch("gemma2", _GEMMA_NORMS, large_layers=46),
    "gemma3_text": GGUFArch("gemma3", _GEMMA_NORMS, large_layers=62),
}


def model_type(arch: str, experts: int, window: bool) -> str | None:
    """The tuili model_type of a GGUF architecture (llama with experts: Mixtral; with a sliding
    window: Mistral); None: not read."""
    if arch == "llama" and experts:
        return "mixtral"
    if arch == "mistral" or (arch == "llama" and window):  # "mistral": an early name of the llama graph
        return "mistral"
    types = [t for t, a in ARCHS.items() if a.name == arch and t not in ("mistral", "mixtral")]
    return types[0] if types else None


def gguf_archs() -> list[str]:
    return sorted({a.name for a in ARCHS.values()})
