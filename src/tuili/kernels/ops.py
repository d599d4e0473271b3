"""Entry points of tuili's kernels, each beside its plain PyTorch reference.

`w4_linear` and `w8_linear` compute y = x · dequant(W)ᵀ for the packed layouts of
`tuili.quant.primitives` (see csrc/qgemv.cpp); `w8a8_linear` quantizes x to int8 per token (or
with a static scale) and multiplies by int8 weights (csrc/w8a8.cpp). The C++ path runs for small
M (decoding), where reading the weights once matters; the reference is what tests hold it to,
and what runs where the kernels are not built.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from tuili.kernels import build
from tuili.kernels.contract import ANY_ROWS, MAX_M_F32, MAX_M_F32_AVX2, OPS
from tuili.kernels.int_products import int_mm_is_fast, int_products

# `fallback()`'s switch: a context variable, so it holds for the calls made inside the block (this
# thread or task), not for another thread's engine; an engine takes the option as `kernels=False`.
_FALLBACK: ContextVar[bool] = ContextVar("tuili_kernels_fallback", default=False)


def extension() -> ModuleType | None:
    """The compiled kernels, or None where they are unbuilt or forced off by `fallback()`."""
    return None if _FALLBACK.get() else build.extension()


def native(name: str):
    """The compiled kernel `name`, or None where the PyTorch path must run (layers call this per token)."""
    ext = extension()
    return None if ext is None else getattr(ext, name)


@contextmanager
def fallback(active: bool = True) -> Iterator[None]:
    """Calls inside the block run every op on its PyTorch path (tests, benchmarks and the ONNX
    exporter, which cannot trace into C++); `active=False` changes nothing."""
    token = _FALLBACK.set(active or _FALLBACK.get())
    try:
        yield
    finally:
        _FALLBACK.reset(token)


def available() -> bool:
    return extension() is not None


def isa() -> str:
    ext = extension()
    return ext.isa() if ext is not None else "pytorch"


def unpack_nibbles(packed: Tensor, cols: int) -> Tensor:
    """(…, ceil(cols/32)·16) bytes of 4-bit codes, 32 per 16 bytes (byte j: code j low, code j + 16 high)
    -> (…, cols) unsigned codes (uint8; int32 under torch.export, whose ONNX translation mistypes
    uint8 shifts: onnxruntime refused the graphs of W4 layers wider than 64)."""
    chunks = packed.unflatten(-1, (-1, 16))
    if torch.compiler.is_exporting():
        chunks = chunks.to(torch.int32)
    return torch.cat((chunks & 0xF, chunks >> 4), dim=-1).flatten(-2)[..., :cols]


def _unpack_w4(w: Tensor, cols: int, flip: bool) -> Tensor:
    codes = unpack_nibbles(w, cols)  # (N, K) unsigned
    return codes ^ 8 if flip else codes


def _dequantize(codes: Tensor, scale: Tensor, zs: Tensor, group_size: int) -> Tensor:
    n, k = codes.shape
    g = scale.shape[1]
    padded = F.pad(codes.float(), (0, g * group_size - k)).view(n, g, group_size)
    return (padded * scale[..., None] - zs[..., None]).flatten(1)[:, :k]


def w4_linear_reference(x: Tensor, w: Tensor, scale: Tensor, zs: Tensor, group_size: int, flip: bool) -> Tensor:
    """(M, K) · dequant((N, K/2) packed codes)ᵀ with W = scale · u − zs per group, in fp32."""
    return (x.float() @ _dequantize(_unpack_w4(w, x.shape[1], flip), scale, zs, group_size).T).to(x.dtype)


def w8_linear_reference(x: Tensor, w: Tensor, scale: Tensor, group_size: int) -> Tensor:
    return (x.float() @ _dequantize(w, scale, torch.zeros_like(scale), group_size).T).to(x.dtype)


def _run(name: str, reference, x: Tensor, *args) -> Tensor:
    """The kernel `name` on CPU for at most its contract's rows (any, for ops outside it), else
    its PyTorch twin."""
    op = OPS.get(name)
    fits = x.device.type == "cpu" and (op is None or x.shape[0] <= op.max_rows)
    kernel = native(name) if fits else None
    return kernel(x, *args) if kernel is not None else reference(x, *args)


def w4_linear(x: Tensor, w: Tensor, scale: Tensor, zs: Tensor, group_size: int, flip: bool) -> Tensor:
    return _run("w4_linear", w4_linear_reference, x, w, scale, zs, group_size, flip)


def w8_linear(x: Tensor, w: Tensor, scale: Tensor, group_size: int) -> Tensor:
    return _run("w8_linear", w8_linear_reference, x, w, scale, group_size)


def quantize_groups(x: Tensor, group_size: int) -> Tensor:
    """x (M, K) rounded through int8 with one scale per row and group of `group_size` along K:
    d = max|x_g| / 127, x̂ = round(x / d) · d (W4A8's activations), as float."""
    m, k = x.shape
    groups = -(-k // group_size)
    xg = F.pad(x.float(), (0, groups * group_size - k)).view(m, groups, group_size)
    d = xg.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return ((xg / d).round().clamp(-127, 127) * d).flatten(1)[:, :k]


def w4a8_linear_reference(x: Tensor, w: Tensor, scale: Tensor, zs: Tensor, group_size: int, flip: bool) -> Tensor:
    """W4A8: W4A16's product on activations rounded through int8 per token and weight group."""
    return w4_linear_reference(quantize_groups(x, group_size), w, scale, zs, group_size, flip).to(x.dtype)


def w4a8_linear(x: Tensor, w: Tensor, scale: Tensor, zs: Tensor, group_size: int, flip: bool) -> Tensor:
    return _run("w4a8_linear", w4a8_linear_reference, x, w, scale, zs, group_size, flip)


def quantize_rows_i16(x: Tensor) -> Tensor:
    """x (M, K) rounded through int16 per token, s = max|x_m| / 32767, x̂ = round(x / s) · s, as float
    (the activations of `w8_linear_i16`)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 32767
    return (x / scale).round() * scale


def quantize_rows(x: Tensor, input_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """int8 codes of x (M, K) and their scale: (M, 1) per token, s = max|x_m| / 127, or the static one."""
    x = x.float()
    scale = input_scale if input_scale is not None else x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return (x / scale).round().clamp(-127, 127).to(torch.int8), scale


def w8a8_linear_reference(x: Tensor, w: Tensor, weight_scale: Tensor, input_scale: Tensor | None = None) -> Tensor:
    """(q_x · q_wᵀ) · s_x · s_w in torch._int_mm (int8 × int8 → int32; its transposed view is VNNI's path)."""
    qx, sx = quantize_rows(x, input_scale)
    if torch.compiler.is_exporting():  # ONNX has no _int_mm: integer codes multiplied as floats (exact below 2^24)
        return (qx.float() @ w.float().t() * sx * weight_scale).to(x.dtype)
    return (int_products(qx, w) * sx * weight_scale).to(x.dtype)


def w8a8_linear(x: Tensor, w: Tensor, weight_scale: Tensor, input_scale: Tensor | None = None) -> Tensor:
    return _run("w8a8_linear", w8a8_linear_reference, x, w, weight_scale, input_scale)


def w8a8_gemm(x: Tensor, w: Tensor, weight_scale: Tensor, input_scale: Tensor | None = None) -> Tensor:
    """W8A8 for large batches (prefill): the twin's arithmetic bit for bit, with its quantization of
    the rows and its scaling of the int32 result each done in one pass around torch._int_mm (a
    1B model's 512-token W8A8 prefill 346 -> 464 tokens/s on an Intel Xeon with AMX). Where torch._int_mm
    is a plain loop (no VNNI or AMX) the twin's exact float64 products are the faster route."""
    if not _has_avx512() or not int_mm_is_fast() or x.dim() != 2:
        return w8a8_linear_reference(x, w, weight_scale, input_scale)
    return _run("w8a8_linear_gemm", w8a8_linear_reference, x, w, weight_scale, input_scale)


def w8a8_pack(w: Tensor) -> tuple[Tensor, Tensor] | None:
    """int8 weights (N, K) repacked for the batched VNNI kernel (blocks of 16 rows × 4 k: also
    AMX's tile layout) and their row sums; None where that kernel is not available (no VNNI, or
    the fallback)."""
    ext = extension()
    if ext is None or w.device.type != "cpu" or ext.isa() != "avx512-vnni":
        return None
    packed, row_sum = ext.w8a8_pack(w)
    return packed, row_sum


def w8a8_packed_rows() -> int | None:
    """The batch rows up to which W8A8 runs on its packing: every batch where AMX tile products
    take it (1.2-2× torch._int_mm from 16 to 512 rows on a Xeon), else None (the op's default)."""
    ext = extension()
    return ANY_ROWS if ext is not None and ext.amx() else None


def w8a8_unpack(packed: Tensor, n: int, k: int, out: Tensor | None = None) -> Tensor:
    """The (n, k) int8 weights of a `w8a8_pack` packing, into `out` where given: one strided copy
    (8192 × 2048: 1.4-2.7 ms, against 8+ ms for a 512-row product with them)."""
    blocks, quads = packed.shape[:2]
    words = packed.view(torch.int32).view(blocks, quads, 16).permute(0, 2, 1)
    out = torch.empty(n, k, dtype=torch.int8) if out is None else out
    if blocks * 16 == n and quads * 4 == k:
        out.view(torch.int32).view(blocks, 16, quads).copy_(words)
    else:
        out.copy_(words.reshape(blocks * 16, quads).contiguous().view(torch.int8)[:n, :k])
    return out


def bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 GEMMs beat fp32."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def paged_attention_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> Tensor:
    """Decode attention for q (B, Hq, D) over caches (blocks, block_size, Hkv, D) mapped by block_tables
    (B, max_blocks): softmax(q·Kᵀ·scale)·V over each sequence's context_lens[b] tokens (the last
    `window` when > 0), each score s soft-capped to softcap · tanh(s / softcap) when softcap > 0.
    int8 caches carry one scale per token and head, (blocks, block_size, Hkv)."""
    block_size, kv_heads, dim = k_cache.shape[1:]
    outs = []
    for b, length in enumerate(context_lens.tolist()):
        blocks = block_tables[b, : -(-length // block_size)].long()
        start = max(0, length - window) if window > 0 else 0

        def gather(cache, cache_scale, blocks=blocks, start=start, length=length):
            rows = cache[blocks].reshape(-1, kv_heads, dim)[start:length].float()
            return (
                rows if cache_scale is None else rows * cache_scale[blocks].reshape(-1, kv_heads)[start:length, :, None]
            )

        k, v = gather(k_cache, k_scale), gather(v_cache, v_scale)  # (T, Hkv, D)
        qb = q[b].float().reshape(kv_heads, -1, dim)  # (Hkv, group, D): query heads grouped by their KV head
        scores = torch.einsum("hgd,thd->hgt", qb, k) * scale
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores, dim=-1)
        outs.append(torch.einsum("hgt,thd->hgd", probs, v).reshape(-1, dim))
    return torch.stack(outs).to(q.dtype)


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> Tensor:
    return _run(
        "paged_attention",
        paged_attention_reference,
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        scale,
        k_scale,
        v_scale,
        window,
        softcap,
    )


def paged_write_reference(
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    k: Tensor,
    v: Tensor,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    """Store k, v (N, Hkv, D) at flat `slots` of caches (blocks, block_size, Hkv, D); int8 caches
    take codes and one scale per token and head (tuili.kernels.kv_format.quantize_kv)."""
    from tuili.kernels.kv_format import quantize_kv

    hkv, d = k_cache.shape[2], k_cache.shape[3]
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        flat = cache.view(-1, hkv, d)
        if scales is None:
            flat[slots] = x.to(flat.dtype)
        else:
            codes, scale = quantize_kv(x, "token")
            flat[slots] = codes
            scales.view(-1, hkv)[slots] = scale[..., 0]


def paged_write(
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    k: Tensor,
    v: Tensor,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    _run("paged_write", paged_write_reference, k_cache, v_cache, slots, k, v, k_scale, v_scale)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """w · x / sqrt(mean(x²) + eps), statistics in fp32, as tuili.models.llama.RMSNorm."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, H, D) rotated by cos/sin (B, T, R) in the half-split layout: x·cos + rotate_half(x)·sin
    on each head's first R values (R < D: partial rotary), the rest as they are."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((rope_reference(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, through tuili's fp32 GEMV when few rows meet fp32 weights (decoding: PyTorch's
    sgemv streams the weights at well under the memory bandwidth, and on AMD takes MKL's generic path)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        rows == 0
        or rows > f32_gemv_rows()
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or torch.compiler.is_compiling()
        or not weight.is_contiguous()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return F.linear(x, weight, bias)
    kernel = _fused("f32_linear", x)
    if kernel is None:
        return F.linear(x, weight, bias)
    return kernel(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


@functools.cache
def f32_gemv_rows() -> int:
    """fp32 rows up to which `linear` takes tuili's GEMV on this CPU, PyTorch's sgemm above."""
    return MAX_M_F32 if _has_avx512() else MAX_M_F32_AVX2


@functools.cache
def _has_avx512() -> bool:
    ext = build.extension()
    return ext is not None and ext.isa().startswith("avx512")


def _fused(name: str, x: Tensor):
    """The kernel for an element-wise op, where it applies: CPU, fp32/bf16, and no autograd to record."""
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or (torch.is_grad_enabled() and x.requires_grad)
    ):
        return None
    return native(name)


def silu_mul_(gate: Tensor, up: Tensor) -> Tensor:
    """gate ← silu(gate) · up in place (SwiGLU's product, under no_grad): one pass where the kernels
    run, where PyTorch's `silu_` and `mul_` take two (a 1B model's 2,048 × 8,192 bf16 gate: 13.1 →
    9.7 ms, fp32 10.9 → 7.3, on this memory-bound pass)."""
    kernel = _fused("silu_mul_", gate)  # it runs PyTorch's pair itself where its pass does not apply
    return F.silu(gate, inplace=True).mul_(up) if kernel is None else kernel(gate, up)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    kernel = _fused("rms_norm", x)
    if kernel is None or weight.dtype != x.dtype or (torch.is_grad_enabled() and weight.requires_grad):
        return rms_norm_reference(x, weight, eps)
    return kernel(x, weight, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    kernel = _fused("rope", x)
    return rope_reference(x, cos, sin) if kernel is None else kernel(x, cos, sin)


def argmax(logits: Tensor) -> Tensor:
    """logits.argmax(dim=-1) of (rows, V): greedy decoding's token per row, 7× faster on fp32
    rows of a 49k vocabulary where the kernels run, and 30× on 16 bf16 rows of a 128k one,
    which PyTorch reduces on one thread (the first maximum; NaN counts as largest)."""
    readable = logits.dim() == 2 and logits.dtype in (torch.float32, torch.bfloat16) and logits.shape[1] > 0
    if not readable or not _has_avx512():
        return logits.argmax(dim=-1)
    kernel = _fused("argmax_rows", logits)
    return logits.argmax(dim=-1) if kernel is None else kernel(logits)
