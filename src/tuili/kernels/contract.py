"""The calling convention of tuili's linear kernels, written once.

Every linear kernel takes the activations x (M, K) first, then its tensors, then its integers
(`w4_linear(x, w, scale, zs, group_size, flip)`). `OPS` says, for each, which tensors and integers
those are (a trailing `?`: the tensor may be None) and the rows up to which it beats its PyTorch
twin. A quantized layer describes its product as a `KernelCall`; the layer's own forward, the C++
decode step (tuili.engine.step hands it each call's op name, tensors, integers and bias; the C++
side maps names to functions and nothing else) and the tests all read it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from torch import Tensor

MAX_M = 64  # above this, dequantize once and let the BLAS GEMM reuse the weights across rows
MAX_M_INT8 = 16  # above this, torch._int_mm's blocked GEMM beats one pass per weight row
MAX_M_PACKED = 64  # W8A8 on packed weights (VNNI outer products) beats torch._int_mm up to here (AMX: always)
MAX_M_F32 = 8  # fp32 rows up to which tuili's GEMV beats PyTorch's sgemm with AVX-512 (measured, benchmarks/kernels.py)
MAX_M_F32_AVX2 = 32  # the same on AVX2 (a Zen 3: MKL's sgemm takes its generic path on AMD, 1.1-2× slower to 32 rows)
ANY_ROWS = 1 << 30


@dataclass(frozen=True)
class KernelOp:
    """One kernel: its name in the extension, its tensor and integer arguments after x, and the
    batch rows up to which it runs (above: the layer's PyTorch path)."""

    name: str
    tensors: tuple[str, ...]
    ints: tuple[str, ...]
    max_rows: int

    def required(self) -> tuple[bool, ...]:
        return tuple(not t.endswith("?") for t in self.tensors)


OPS: dict[str, KernelOp] = {
    op.name: op
    for op in (
        KernelOp("w4_linear", ("w", "scale", "zs"), ("group_size", "flip"), MAX_M),
        KernelOp("w8_linear", ("w", "scale"), ("group_size",), MAX_M),
        KernelOp("w4a8_linear", ("w", "scale", "zs"), ("group_size", "flip"), MAX_M),
        # symmetric: zs is 8 · scale (symmetric codes, read as u = code + 8) and the kernel does not read it;
        # every batch: on a Zen 3, 119-142 GOPS at 16-256 rows against 71-91 GFLOP/s for dequantize + sgemm
        KernelOp("w4a8_linear_nmajor", ("packed", "scale", "zs"), ("N", "group_size", "symmetric"), ANY_ROWS),
        KernelOp("w4_linear_bf16", ("packed", "scale", "zs"), ("N", "group_size"), MAX_M),
        KernelOp("w8_linear_i16", ("packed", "scale"), ("N", "group_size"), MAX_M),
        KernelOp("w8a8_linear", ("w", "weight_scale", "input_scale?"), (), MAX_M_INT8),
        KernelOp("w8a8_linear_packed", ("packed", "row_sum", "weight_scale", "input_scale?"), ("N",), MAX_M_PACKED),
        # a float layer as tuili.kernels.ops.linear runs it: tuili's fp32 GEMV up to gemv_rows
        # (tuili.kernels.ops.f32_gemv_rows()) rows, PyTorch's linear above and for 16-bit weights; the bias inside
        KernelOp("linear", ("w", "bias?"), ("gemv_rows",), ANY_ROWS),
    )
}


@dataclass(frozen=True)
class KernelCall:
    """One layer's product as a kernel call: y = op(x, *tensors, *ints) (+ bias, the layer's).

    `small`: another call of the same product for batches of at most `small_rows` rows, where
    this CPU runs it faster (the fp32-activation GEMV beside a bf16 dot-product kernel, chosen by
    tuili.kernels.repack.small_batch_rows). `row_limit`: the rows up to which this call runs where
    this CPU takes it further than the op's default (W8A8 on AMX: every batch)."""

    op: KernelOp
    tensors: tuple[Tensor | None, ...]
    ints: tuple[int, ...]
    bias: Tensor | None = None
    small: KernelCall | None = None
    small_rows: int = 0
    row_limit: int | None = None
    args: tuple = field(init=False, repr=False, compare=False)  # tensors then ints, as the kernel takes them

    def __post_init__(self) -> None:
        op = self.op
        if len(self.tensors) != len(op.tensors) or len(self.ints) != len(op.ints):
            raise TypeError(
                f"{op.name} takes tensors {op.tensors} and integers {op.ints}, "
                f"got {len(self.tensors)} tensors and {len(self.ints)} integers"
            )
        missing = [n for n, t, needed in zip(op.tensors, self.tensors, op.required()) if needed and t is None]
        if missing:
            raise TypeError(f"{op.name} needs {', '.join(missing)}")
        object.__setattr__(self, "ints", tuple(int(i) for i in self.ints))
        object.__setattr__(self, "args", (*self.tensors, *self.ints))

    @classmethod
    def of(
        cls,
        name: str,
        *tensors: Tensor | None,
        ints: tuple[int, ...] = (),
        bias: Tensor | None = None,
        row_limit: int | None = None,
    ):
        return cls(OPS[name], tensors, ints, bias, row_limit=row_limit)

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def max_rows(self) -> int:
        return self.op.max_rows if self.row_limit is None else self.row_limit

    def weights(self) -> list[Tensor]:
        """Every tensor the call reads, bias included."""
        return [t for t in (*self.tensors, self.bias) if t is not None]

    def run(self, ext: ModuleType, x: Tensor) -> Tensor:
        """The kernel on x (M, K) for M ≤ max_rows, without the bias."""
        if self.small is not None and x.shape[0] <= self.small_rows:
            return self.small.run(ext, x)
        return getattr(ext, self.op.name)(x, *self.args)
