"""Fused CPU kernels (C++, AVX-512 / AVX2), built on first use, each with a PyTorch twin."""

from tuili.kernels.ops import (
    available,
    fallback,
    isa,
    linear,
    paged_attention,
    paged_attention_reference,
    paged_write,
    paged_write_reference,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    w4_linear,
    w4_linear_reference,
    w4a8_linear,
    w4a8_linear_reference,
    w8_linear,
    w8_linear_reference,
    w8a8_linear,
    w8a8_pack,
    w8a8_linear_reference,
)

__all__ = ["available", "fallback", "isa", "linear", "paged_attention", "paged_attention_reference", "paged_write", "paged_write_reference", "rms_norm",
           "rms_norm_reference", "rope", "rope_reference", "w4_linear",
           "w4_linear_reference", "w4a8_linear", "w4a8_linear_reference", "w8_linear", "w8_linear_reference",
           "w8a8_linear", "w8a8_pack", "w8a8_linear_reference"]
