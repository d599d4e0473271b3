"""Export to ONNX: the model's logits for (batch, tokens) ids, runnable in onnxruntime.

The graph comes from `torch.onnx.export(dynamo=True)` (torch.export, then onnxscript), with the
batch and sequence lengths dynamic. tuili's C++ kernels are opaque to the exporter, so every op
takes its PyTorch path while exporting: quantized layers become their dequantize-and-matmul
(integer codes stored as initializers). `check_onnx` runs the file in onnxruntime and compares
its logits with tuili's. Every export (ONNX here, GGUF in gguf_export) is written to a temporary
name, checked there (`verify`: the file loads and gives tuili's logits), and only then renamed into
place: an export that fails its check leaves no file behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tuili.errors import TuiliError
from tuili.kernels import ops as kernels
from tuili.models.io import atomic_file
from tuili.models.lazy import onload_all
from tuili.models.model import Model


class ExportError(TuiliError, RuntimeError):
    """The model could not be exported, or its export does not reproduce it."""


class _Logits(nn.Module):
    """ids (B, T) -> logits (B, T, V): the model without a cache, as ONNX runtimes call it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, ids: Tensor) -> Tensor:
        return self.module(ids).logits


def _require(package: str):
    try:
        return __import__(package)
    except ImportError:
        raise ExportError(f"ONNX export needs the {package} package: pip install 'tuili[export]'") from None


@dataclass
class ONNXExport:
    path: Path
    max_abs_diff: float | None  # onnxruntime's logits against tuili's (None: not checked)


def export_onnx(model: Model, path: str | Path, max_tokens: int | None = None, check: bool = True) -> ONNXExport:
    """Write `model` as an ONNX graph to `path`, checked in onnxruntime first (`check`), atomically."""
    _require("onnxscript")
    onload_all(model.module)
    path = Path(path)
    max_tokens = max_tokens or model.config.max_position_embeddings
    sample = torch.randint(0, model.config.vocab_size, (1, min(8, max_tokens)))
    batch, tokens = torch.export.Dim("batch", max=1024), torch.export.Dim("tokens", max=max_tokens)
    with atomic_file(path, suffix=".onnx") as tmp:
        try:
            with torch.no_grad(), kernels.fallback():  # the exporter cannot trace into the C++ kernels
                program = torch.onnx.export(
                    _Logits(model.module).eval(),
                    (sample,),
                    dynamo=True,
                    verbose=False,
                    input_names=["input_ids"],
                    output_names=["logits"],
                    dynamic_shapes={"ids": {0: batch, 1: tokens}},
                )
            program.save(str(tmp))
        except Exception as e:  # the exporter's own errors are long; keep their first line
            raise ExportError(f"ONNX export of {model.source} failed: {_first_line(e)}") from e
        diff = verify(check_onnx, tmp, model, "onnxruntime") if check else None
    return ONNXExport(path, diff)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def verify(
    check: Callable[[Path, Model, Tensor], float], path: Path, model: Model, reader: str, half: bool = False
) -> float:
    """The largest logit difference `check` finds between the written file and `model`; ExportError
    (no traceback) if the file does not load or its logits are off by more than 1e-3 of their scale
    (5e-2 where the model or the file holds half-precision weights: `half`)."""
    ids = sample_ids(model)
    try:
        diff = check(path, model, ids)
    except Exception as e:  # noqa: BLE001 - a reader's own error types: the file is not valid
        raise ExportError(f"the exported file does not load in {reader}: {_first_line(e)}") from e
    with torch.no_grad():
        scale = max(1.0, float(model.module(ids).logits.abs().max()))
    limit = (5e-2 if half or model.module.dtype != torch.float32 else 1e-3) * scale
    if not diff <= limit:
        raise ExportError(
            f"the exported file's logits differ from tuili's by {diff:.3g} in {reader} "
            f"(allowed {limit:.3g}); nothing was written"
        )
    return diff


def sample_ids(model: Model, batch: int = 2, tokens: int = 32, seed: int = 0) -> Tensor:
    """Random token ids (batch, tokens) for checking an export."""
    tokens = min(tokens, model.config.max_position_embeddings)
    return torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def check_onnx(path: str | Path, model: Model, ids: Tensor) -> float:
    """Largest absolute difference between onnxruntime's logits for `ids` (B, T) and tuili's."""
    ort = _require("onnxruntime")
    runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = runtime.run(["logits"], {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = model.module(ids).logits
    return float((torch.from_numpy(output) - expected).abs().max())


__all__ = ["ExportError", "ONNXExport", "check_onnx", "export_onnx", "sample_ids", "verify"]
