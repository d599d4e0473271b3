"""int8 × int8 products, exactly: torch._int_mm where the CPU has int8 dot products for it, a float64
GEMM where PyTorch's int8 GEMM would be a plain loop. The W8A8 twin and its batched path ask here."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from tuili.kernels import build


@functools.cache
def int_mm_is_fast() -> bool:
    """Whether PyTorch's int8 GEMM has the CPU's int8 dot products (AVX512-VNNI, AMX) to run on.
    Without them it is a plain loop: 512 × 576 × 1536 took 464 ms on a Zen 3 core, 17× an fp32 GEMM."""
    flags = build.cpu_id()
    return "avx512_vnni" in flags or "amx_int8" in flags


def int_products_f64(qx: Tensor, w: Tensor, rows: int = 4096) -> Tensor:
    """qx · wᵀ of int8 codes, exact, as a float64 GEMM (int8 products summed exactly up to 2^53; the
    same integers torch._int_mm gives) on `rows` output features at a time, to bound the float64
    copy of the weights: 52 ms where torch._int_mm took 464 on that Zen 3 core."""
    a = qx.double()
    return torch.cat([a @ w[n : n + rows].double().t() for n in range(0, w.shape[0], rows)], dim=1)


def int_products(qx: Tensor, w: Tensor) -> Tensor:
    """qx · wᵀ of int8 codes (M, K) and (N, K) as fp32: the exact integer sums, by the faster route here."""
    if qx.device.type == "cpu" and not int_mm_is_fast():
        return int_products_f64(qx, w).float()
    return torch._int_mm(qx, w.t()).float()
