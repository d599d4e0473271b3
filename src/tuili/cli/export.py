"""`tuili export`: ONNX or GGUF, checked before it lands."""

from __future__ import annotations

import time
from pathlib import Path

from tuili.cli.common import (
    load_model,
    model_args,
)
from tuili.errors import TuiliError


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model (float or quantized) to ONNX or GGUF and check it")
    model_args(p)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the .onnx or .gguf file to write (atomically); the suffix picks the format",
    )
    p.add_argument("--gguf-float", default="f16", choices=["f16", "f32"], help="GGUF: the type of float weights")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check (ONNX: run in onnxruntime; GGUF: read back and compare logits)",
    )
    p.set_defaults(run=_export)


def _export(args) -> None:
    from tuili.pipeline.export import export_onnx
    from tuili.pipeline.gguf_export import export_gguf

    if args.out.suffix not in (".onnx", ".gguf"):
        raise TuiliError(f"--out must name a .onnx or .gguf file, got {args.out}")
    model = load_model(args)
    start = time.perf_counter()
    if args.out.suffix == ".gguf":
        written = export_gguf(model, args.out, args.gguf_float, check=not args.no_check)
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(written.tensor_types.items()))
        detail, what, notes = f"; tensors: {kinds}", "the GGUF file read back", list(written.notes)
        if written.dequantized:
            notes.append(
                f"{len(written.dequantized)} quantized layers have no GGUF block type of their format "
                f"and were written dequantized (F16): {', '.join(written.dequantized[:3])}, ..."
            )
    else:
        written = export_onnx(model, args.out, check=not args.no_check)
        detail, what, notes = "", "onnxruntime", []
    path = written.path
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB{detail}) in {time.perf_counter() - start:.1f} s")
    print(*notes, sep="\n", end="\n" if notes else "")
    if written.max_abs_diff is not None:
        print(f"logits of {what} vs tuili's, 2 × 32 tokens: max abs diff {written.max_abs_diff:.2e}")
