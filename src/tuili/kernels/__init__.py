"""Fused CPU kernels (C++, AVX-512 / AVX2), built on first use, each with a PyTorch twin."""

from tuili.kernels.ops import available, fallback, isa, w4_linear, w4_linear_reference, w8_linear, w8_linear_reference

__all__ = ["available", "fallback", "isa", "w4_linear", "w4_linear_reference", "w8_linear", "w8_linear_reference"]
