"""GFLOP/s of tuili's W8, W4 and fp32 small-batch kernels against PyTorch's F.linear, by batch rows.

    .venv/bin/python benchmarks/gemm_rows.py [--rows 1 4 16 64] [--threads 2] [--extension OLD.so]

Shapes: two of the default model's layers (weights in L2) and a 1B model's 8192 × 2048 (its W8 and
W4 codes, 16 and 8 MiB, fit a 32 MiB L3; its fp32 weight does not); W8 per channel or per group, W4
symmetric codes. F.linear runs on the dequantized fp32 weight (the ceiling a dequantize-then-GEMM
path could reach). `--extension` loads another build of the kernels (an earlier commit's
`~/.cache/tuili/kernels/<key>/tuili_kernels.so`) instead of this one's, for before/after tables
from the same script.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
import torch.nn.functional as F

from tuili.kernels.build import extension

SHAPES = ((1536, 576, 576), (576, 1536, 128), (8192, 2048, 2048))  # N, K, group size


def best(fn, *args, repeats: int = 15) -> float:
    """The fastest of `repeats` calls, in seconds (NaN where the build refuses the call on this CPU)."""
    try:
        fn(*args)
    except RuntimeError:
        return float("nan")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def load(path: str | None):
    if path is None:
        return extension()
    spec = importlib.util.spec_from_file_location("tuili_kernels", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extension", help="a tuili_kernels.so to measure instead of this build's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ext = load(args.extension)
    g = torch.Generator().manual_seed(0)
    print(f"\nGFLOP/s, {args.threads} threads ({ext.isa()} kernels)\n")
    print("| N × K, group | rows | W8 | W4 | fp32 (tuili) | F.linear on fp32 |\n|---|---:|---:|---:|---:|---:|")
    for n, k, group in SHAPES:
        groups = -(-k // group)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scale = torch.rand(n, groups, generator=g) * 0.01 + 0.001
        w4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        zs = scale * 8
        weight = ext.dequantize_w8(w8, scale, group, False, None)
        for m in args.rows:
            x = torch.randn(m, k, generator=g)
            flop = 2 * m * n * k / 1e9
            cells = [
                best(ext.w8_linear, x, w8, scale, group),
                best(ext.w4_linear, x, w4, scale, zs, group, True),
                best(ext.f32_linear, x, weight, None),
                best(F.linear, x, weight),
            ]
            print(f"| {n} × {k}, g{group} | {m} | " + " | ".join(f"{flop / t:.1f}" for t in cells) + " |")


if __name__ == "__main__":
    main()
