"""Registry of checkpoint formats for compressed layers (e.g. compressed-tensors).

`models` must not import the compression packages above it, so they register here how their
layers are written to and read from a folder; `Model.save` and `tuili.load` look them up by the
`quant_method` that the folder's config.json names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

StoredName = Callable[[str], str]  # a module's name -> the name its checkpoint stores it under


@dataclass(frozen=True)
class CheckpointFormat:
    # (module on the meta device, state dict read from disk, quantization_config, stored name of a
    # module) -> None: replaces the compressed layers in place and removes their tensors from the state dict
    load: Callable[[nn.Module, dict[str, Tensor], dict[str, Any], StoredName], None]
    # Writing (None: tuili only reads the format). `save_config`: (module, stored name of a module)
    # -> the quantization_config for config.json, naming the modules as stored (tuili.models.families).
    # `save_layer`: (one compressed layer, the model's float dtype) -> the tensors stored in place of
    # its own (bias apart), so that a model is converted and written one layer at a time.
    save_config: Callable[[nn.Module, StoredName], dict[str, Any]] | None = None
    save_layer: Callable[[nn.Module, torch.dtype], dict[str, Tensor]] | None = None


FORMATS: dict[str, CheckpointFormat] = {}


def register(quant_method: str, fmt: CheckpointFormat) -> None:
    FORMATS[quant_method] = fmt


def format_of(module: nn.Module) -> str | None:
    """The quant_method of the module's compressed layers, None for a plain float model."""
    methods = {m.quant_method for m in module.modules() if hasattr(m, "quant_method")}
    assert len(methods) <= 1, f"layers of several checkpoint formats in one model: {methods}"
    return methods.pop() if methods else None
