"""tuili's kernels against PyTorch's own, at the default model's linear shapes, in one run.

    .venv/bin/python benchmarks/kernels.py [--repeats 5] [--batch 1 16 64]

Every implementation gets its own copy of the weights of all 211 linear layers (30 decoder layers
× 7, plus the 576 × 49152 head), so a pass over them streams the weights from memory as decoding
does. Per implementation: microseconds per call at each shape (averaged over that shape's 30
copies), effective GB/s (weight bytes / time) beside a STREAM-like copy measured in the same run,
and the time per token of a pass over all 211 layers at batch M (one pass, divided by M). Then the
fused element-wise ops and paged decode attention beside their PyTorch equivalents.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuili import kernels
from tuili.models import LlamaConfig
from tuili.pipeline.report import markdown_table
from tuili.quant.kernel_layer import compute_dtype
from tuili.quant.linear import Int8Linear, W4A8Linear, WeightOnlyLinear
from tuili.quant.primitives import quantize_weight

SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
)


def linear_shapes(config: LlamaConfig) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every linear layer, in forward order."""
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    layer = [
        ("q_proj", h, h),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", h, h),
        ("gate_proj", h, i),
        ("up_proj", h, i),
        ("down_proj", i, h),
    ]
    return layer * config.num_hidden_layers + [("lm_head", h, config.vocab_size)]


@dataclass
class Impl:
    name: str
    prepare: Callable[[Tensor], object]  # fp32 weight (N, K) -> what call() reads
    call: Callable[[Tensor, object], Tensor]
    dtype: torch.dtype = torch.float32
    kernels: bool = True  # False: tuili's PyTorch fallback
    compute: torch.dtype | None = None  # tuili.quant.linear.compute_dtype (the engine's bf16 activations)


def _module(weight: Tensor, factory) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return factory(linear)


def _int4pack(weight: Tensor, group_size: int = 64):
    qw = quantize_weight(weight, 4, group_size, symmetric=False)
    codes = qw.q.to(torch.int32)  # (N, K) unsigned 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scale = qw.scale.T.contiguous()  # (G, N)
    zero = ((8 - qw.zero.T) * scale).contiguous()  # torch's form: w = (q − 8) · s + z
    return packed, group_size, torch.stack([scale, zero], dim=-1).contiguous()


def implementations() -> list[Impl]:
    w8 = lambda w: _module(w, lambda m: WeightOnlyLinear.from_float(m, 8, "channel", True))  # noqa: E731
    w4 = lambda w: _module(w, lambda m: WeightOnlyLinear.from_float(m, 4, 64, False))  # noqa: E731
    w4a8 = lambda w: _module(w, lambda m: W4A8Linear.from_float(m, 4, 64, False))  # noqa: E731
    w8a8 = lambda w: _module(w, Int8Linear.from_float)  # noqa: E731
    int8pack = lambda w: (lambda q: (q.q, q.scale[:, 0].contiguous()))(quantize_weight(w, 8, "channel", True))  # noqa: E731
    impls = [
        Impl("fp32 F.linear", lambda w: w, lambda x, w: F.linear(x, w)),
        Impl("tuili fp32 GEMV (kernels.linear)", lambda w: w, lambda x, w: kernels.linear(x, w)),
        Impl("bf16 F.linear", lambda w: w.bfloat16(), lambda x, w: F.linear(x, w), torch.bfloat16),
        Impl("aten._weight_int8pack_mm", int8pack, lambda x, s: torch.ops.aten._weight_int8pack_mm(x, s[0], s[1])),
        Impl(
            "aten._weight_int4pack_mm_for_cpu g64",
            _int4pack,
            lambda x, s: torch.ops.aten._weight_int4pack_mm_for_cpu(x, *s),
        ),
    ]
    for label, make, fallback in (
        ("W8A16", w8, "dequantize + F.linear"),
        ("W4A16 g64", w4, "dequantize + F.linear"),
        ("W4A8 g64", w4a8, "dequantize + F.linear"),
        ("W8A8 dynamic", w8a8, "torch._int_mm"),
    ):
        impls.append(Impl(f"tuili {label}", make, lambda x, m: m(x)))
        impls.append(Impl(f"tuili {label}, fallback ({fallback})", make, lambda x, m: m(x), kernels=False))
    # the engine's 16-bit activations (compute_dtype(bf16)): W8 × int16 (VNNI), W4 × bf16 (AVX512-BF16)
    for label, make in (("W8A16, int16 activations", w8), ("W4A16 g64, bf16 activations", w4)):
        impls.append(Impl(f"tuili {label}", make, lambda x, m: m(x), compute=torch.bfloat16))
    return impls


def stream_copy_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Read + write bandwidth of a large tensor copy (STREAM's 'copy'), GB/s."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(repeats))
    return 2 * a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bytes(state) -> int:
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, nn.Module):
        return sum(t.numel() * t.element_size() for t in list(state.buffers()) + list(state.parameters()))
    return sum(_bytes(s) for s in state if isinstance(s, (Tensor, nn.Module)))


def measure(impl: Impl, shapes, batches, repeats: int, generator: torch.Generator) -> dict:
    states = [impl.prepare(torch.randn(n, k, generator=generator) * 0.02) for _, k, n in shapes]
    weight_bytes = sum(_bytes(s) for s in states)
    context = kernels.fallback() if not impl.kernels else torch.no_grad()
    per_token, per_shape = {}, {}
    with torch.no_grad(), context, compute_dtype(impl.compute):
        for m in batches:
            xs = {k: torch.randn(m, k, generator=generator).to(impl.dtype) for _, k, _ in shapes}

            def one_pass(xs=xs):
                for (_, k, _), state in zip(shapes, states):
                    impl.call(xs[k], state)

            one_pass()  # warm-up (and the kernels' first-use build)
            per_token[m] = min(_timed(one_pass) for _ in range(repeats)) / m
        x1 = {k: torch.randn(1, k, generator=generator).to(impl.dtype) for _, k, _ in shapes}
        for shape in dict.fromkeys((name, k, n) for name, k, n in shapes):
            mine = [s for sh, s in zip(shapes, states) if sh == shape]

            def calls(shape=shape, mine=mine):
                return [impl.call(x1[shape[1]], s) for s in mine]

            seconds = min(_timed(calls) for _ in range(repeats))
            per_shape[shape] = (seconds / len(mine), _bytes(mine[0]))
    return {"bytes": weight_bytes, "per_token": per_token, "per_shape": per_shape}


def op_rows(config: LlamaConfig, repeats: int) -> list[list[str]]:
    """Per-call µs of the element-wise ops and decode attention at batch-1 decode shapes."""
    h, d, kv = config.hidden_size, config.head_dim, config.num_key_value_heads
    heads = config.num_attention_heads
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, h, generator=g), torch.rand(h, generator=g)
    q = torch.randn(1, 1, heads, d, generator=g)
    angles = torch.rand(1, 1, d // 2, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    rows = []
    with torch.no_grad():
        cases = [
            ("RMSNorm 576", lambda: kernels.rms_norm(x, w, 1e-5), lambda: kernels.rms_norm_reference(x, w, 1e-5)),
            ("RoPE 9 heads × 64", lambda: kernels.rope(q, cos, sin), lambda: kernels.rope_reference(q, cos, sin)),
        ]
        for context in (128, 1024):
            blocks = -(-context // 16)
            k_cache = torch.randn(blocks, 16, kv, d, generator=g)
            v_cache = torch.randn(blocks, 16, kv, d, generator=g)
            table = torch.arange(blocks, dtype=torch.int32)[None]
            lens = torch.tensor([context], dtype=torch.int32)
            qd = torch.randn(1, heads, d, generator=g)
            kc = k_cache.reshape(1, -1, kv, d)[:, :context].transpose(1, 2).repeat_interleave(heads // kv, 1)
            vc = v_cache.reshape(1, -1, kv, d)[:, :context].transpose(1, 2).repeat_interleave(heads // kv, 1)
            paged = (qd, k_cache, v_cache, table, lens, d**-0.5)
            cases.append(
                (
                    f"paged decode attention, {context} tokens (PyTorch: gather + einsum)",
                    lambda a=paged: kernels.paged_attention(*a),
                    lambda a=paged: kernels.paged_attention_reference(*a),
                )
            )
            cases.append(
                (
                    f"paged decode attention, {context} tokens (PyTorch: SDPA on a contiguous cache)",
                    lambda a=paged: kernels.paged_attention(*a),
                    lambda a=(qd[:, :, None], kc, vc): F.scaled_dot_product_attention(*a),
                )
            )
        for name, fused, reference in cases:
            times = []
            for fn in (fused, reference):
                for _ in range(20):
                    fn()
                times.append(min(_timed(lambda fn=fn: [fn() for _ in range(200)]) for _ in range(repeats)) / 200)
            rows.append([name, f"{times[0] * 1e6:.1f}", f"{times[1] * 1e6:.1f}", f"{times[1] / times[0]:.1f}×"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--only", help="run implementations whose name contains this")
    parser.add_argument("--ops-only", action="store_true", help="only the element-wise ops and attention")
    args = parser.parse_args()
    shapes = linear_shapes(SMOLLM2)
    generator = torch.Generator().manual_seed(0)
    copy_gbs = stream_copy_gbs()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, tuili kernels: {kernels.isa()}; "
        f"{len(shapes)} linear layers; STREAM-like copy: {copy_gbs:.1f} GB/s\n"
    )
    if args.ops_only:
        print(markdown_table(["op", "tuili kernel", "PyTorch", "speed-up"], op_rows(SMOLLM2, args.repeats)))
        return
    results = {}
    for impl in implementations():
        if args.only and args.only not in impl.name:
            continue
        results[impl.name] = measure(impl, shapes, args.batch, args.repeats, generator)
        print(f"  measured {impl.name}", flush=True)
    fp32 = results.get("fp32 F.linear")
    headers = ["implementation", "weights"] + [f"ms/token M={m}" for m in args.batch]
    headers += ["vs fp32 M=1", "GB/s M=1", f"M={args.batch[-1]} vs M=1 per token"]
    rows = []
    for name, r in results.items():
        t1 = r["per_token"][args.batch[0]]
        rows.append(
            [name, f"{r['bytes'] / 2**20:.1f} MiB"]
            + [f"{r['per_token'][m] * 1e3:.2f}" for m in args.batch]
            + [
                f"{fp32['per_token'][args.batch[0]] / t1:.2f}×" if fp32 else "",
                f"{r['bytes'] / t1 / 1e9:.1f}",
                f"{t1 / r['per_token'][args.batch[-1]]:.1f}×",
            ]
        )
    print(markdown_table(headers, rows))
    print("\nPer call at M=1, µs (GB/s), averaged over each shape's copies:\n")
    shape_keys = list(next(iter(results.values()))["per_shape"])
    headers = ["implementation"] + [f"{name} {k}→{n}" for name, k, n in shape_keys]
    rows = [
        [name] + [f"{t * 1e6:.0f} ({b / t / 1e9:.0f})" for t, b in (r["per_shape"][s] for s in shape_keys)]
        for name, r in results.items()
    ]
    print(markdown_table(headers, rows))
    print("\nElement-wise ops and decode attention at batch-1 decode shapes, µs per call:\n")
    print(markdown_table(["op", "tuili kernel", "PyTorch", "speed-up"], op_rows(SMOLLM2, args.repeats)))


if __name__ == "__main__":
    main()
