"""Decoder layers read from disk when first used: `tuili.load(folder, lazy=True)`.

A lazy model holds its embedding, final norm and head; each decoder layer is an empty (meta
device) shell until a layer-by-layer verb or a forward reaches it, and is then read from the
checkpoint in the model's dtype. `quantize_` (any method) and `prune_` with Wanda or SparseGPT
visit the layers in order and drop each float layer once it is replaced, so compressing a model
holds one float decoder layer at a time beside what is already compressed: the model's size is
bounded by the compressed result, not the float checkpoint (llm-compressor onloads layers the
same way). Whatever needs every layer at once (serving, saving, magnitude pruning, distilling)
reads the rest first, through `onload_all`.
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from tuili.models.checkpoint import Checkpoint
from tuili.models.config import LlamaConfig
from tuili.models.families import to_tuili

_PREFIX = "model.layers."


class LazyLayers:
    """The decoder layers of one model still on disk, each read once, on first use."""

    def __init__(self, checkpoint: Checkpoint, config: LlamaConfig, source: str):
        self.checkpoint, self.config, self.source = checkpoint, config, source
        self.pending: dict[int, RemovableHandle] = {}

    def attach(self, module: nn.Module) -> None:
        """Leave `module`'s decoder layers to be read on first use (a forward reads them too)."""
        for i in range(len(module.model.layers)):  # type: ignore[union-attr,arg-type]
            self._watch(module, i)
        module.lazy_layers = self  # type: ignore[assignment]

    def _watch(self, module: nn.Module, i: int) -> None:
        layer = module.model.layers[i]  # type: ignore[union-attr,index]
        self.pending[i] = layer.register_forward_pre_hook(lambda _m, _args, i=i: self.onload(module, i))

    def offload(self, module: nn.Module, i: int) -> None:
        """Drop decoder layer `i`'s weights (read as they are on disk, never changed) back to empty
        shells, to be read again on next use: a pass over every layer that only reads them holds
        one at a time."""
        if i in self.pending:
            return
        module.model.layers[i].to("meta")  # type: ignore[union-attr,index]
        self._watch(module, i)

    def onload(self, module: nn.Module, i: int) -> None:
        """Read decoder layer `i` into `module` in its dtype and device (once)."""
        if i not in self.pending:
            return
        prefix = f"{_PREFIX}{i}."
        names = [n for n in self.checkpoint.where if n.startswith(prefix)]
        state = to_tuili(self.checkpoint.read(names), self.config, self.source)
        dtype, device = module.dtype, module.device  # type: ignore[union-attr]
        local = {
            k[len(prefix) :]: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            for k, v in state.items()
        }
        module.model.layers[i].load_state_dict(local, strict=True, assign=True)  # type: ignore[union-attr,index]
        self.pending.pop(i).remove()


def onload(module: nn.Module, i: int) -> None:
    """Make sure decoder layer `i` of `module` is in memory (a no-op unless loaded lazily)."""
    lazy = getattr(module, "lazy_layers", None)
    if lazy is not None:
        lazy.onload(module, i)


def on_disk(module: nn.Module) -> set[int]:
    """The decoder layers of `module` not yet read (empty for a model loaded whole)."""
    lazy = getattr(module, "lazy_layers", None)
    return set(lazy.pending) if lazy is not None else set()


def offload(module: nn.Module, i: int) -> None:
    """Put decoder layer `i` of a lazy model back on disk (LazyLayers.offload); a no-op otherwise."""
    lazy = getattr(module, "lazy_layers", None)
    if lazy is not None:
        lazy.offload(module, i)


def onload_for(module: nn.Module, name: str) -> None:
    """Make sure the decoder layer holding submodule `name` is in memory."""
    if name.startswith(_PREFIX):
        onload(module, int(name[len(_PREFIX) :].split(".", 1)[0]))


def onload_all(module: nn.Module) -> None:
    """Read every decoder layer still on disk (for what needs the whole model at once)."""
    lazy = getattr(module, "lazy_layers", None)
    if lazy is not None:
        for i in sorted(lazy.pending):
            lazy.onload(module, i)
