"""Export to ONNX: the model's logits for (batch, tokens) ids, runnable in onnxruntime.

The graph comes from `torch.onnx.export(dynamo=True)` (torch.export, then onnxscript), with the
batch and sequence lengths dynamic. tuili's C++ kernels are opaque to the exporter, so every op
takes its PyTorch path while exporting: quantized layers become their dequantize-and-matmul
(integer codes stored as initializers). `check_onnx` runs the file in onnxruntime and compares
its logits with tuili's. The file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from tuili.errors import TuiliError
from tuili.kernels import ops as kernels
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


def export_onnx(model: Model, path: str | Path, max_tokens: int | None = None) -> Path:
    """Write `model` as an ONNX graph to `path` (atomically) and return the path."""
    _require("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    max_tokens = max_tokens or model.config.max_position_embeddings
    sample = torch.randint(0, model.config.vocab_size, (1, min(8, max_tokens)))
    batch, tokens = torch.export.Dim("batch", max=1024), torch.export.Dim("tokens", max=max_tokens)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), kernels.fallback():  # the exporter cannot trace into the C++ kernels
            program = torch.onnx.export(_Logits(model.module).eval(), (sample,), dynamo=True, verbose=False,
                                        input_names=["input_ids"], output_names=["logits"],
                                        dynamic_shapes={"ids": {0: batch, 1: tokens}})
        program.save(tmp)
        os.replace(tmp, path)
    except Exception as e:  # the exporter's own errors are long; keep their first line
        raise ExportError(f"ONNX export of {model.source} failed: {str(e).splitlines()[0][:300]}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def sample_ids(model: Model, batch: int = 2, tokens: int = 32, seed: int = 0) -> Tensor:
    """Random token ids (batch, tokens) for checking an export."""
    tokens = min(tokens, model.config.max_position_embeddings)
    return torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def check_onnx(path: str | Path, model: Model, ids: Tensor) -> float:
    """Largest absolute difference between onnxruntime's logits for `ids` (B, T) and tuili's."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(["logits"], {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = model.module(ids).logits
    return float((torch.from_numpy(output) - expected).abs().max())


__all__ = ["ExportError", "check_onnx", "export_onnx", "sample_ids"]
