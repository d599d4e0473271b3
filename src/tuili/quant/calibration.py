"""Calibration plumbing: see what each linear layer receives, one decoder layer at a time.

Sequential (as GPTQ and llm-compressor do): calibration samples run through the embedding, then
through each decoder layer in turn; a layer is quantized from what it received, and its quantized
output is what the next layer receives. Only one layer's inputs are held at a time, so memory
stays bounded whatever the model's depth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm import tqdm

from tuili.models.attention import rope_cos_sin
from tuili.models.llama import LlamaForCausalLM


@contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Call fn(name, x) with the (tokens, in_features) input of each module on every forward."""
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: fn(name, args[0].reshape(-1, args[0].shape[-1])))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class LayerRunner:
    """Runs calibration samples (N, T) through a LlamaForCausalLM one decoder layer at a time."""

    def __init__(self, module: LlamaForCausalLM, calib: Tensor, batch_size: int = 8):
        self.module, self.batch_size = module, batch_size
        device = module.device
        calib = calib.to(device)
        with torch.no_grad():
            self.hidden = module.model.embed_tokens(calib)  # (N, T, H)
        n, t = calib.shape
        self.positions = torch.arange(t, device=device).expand(n, t)
        self.cos, self.sin = rope_cos_sin(module.inv_freq, self.positions[:1], self.hidden.dtype)

    @torch.no_grad()
    def run(self, layer: nn.Module) -> Tensor:
        """The layer's output for every sample (hooks on its linears see all inputs)."""
        outs = []
        for start in range(0, self.hidden.shape[0], self.batch_size):
            x = self.hidden[start : start + self.batch_size]
            b = x.shape[0]
            out, _ = layer(x, self.positions[:b], self.cos.expand(b, -1, -1), self.sin.expand(b, -1, -1), None, False)
            outs.append(out)
        return torch.cat(outs)

    def layers(self, desc: str, progress: bool = True) -> Iterator[tuple[int, nn.Module]]:
        """Yield (index, layer); after the caller has changed the layer, its output feeds the next."""
        layers = self.module.model.layers
        for i, layer in enumerate(tqdm(layers, desc=desc, unit="layer", disable=not progress, leave=False)):
            yield i, layer
            self.hidden = self.run(layer)


def require_tuili_model(module: nn.Module, method: str) -> LlamaForCausalLM:
    if not isinstance(module, LlamaForCausalLM):
        raise ValueError(
            f"{method} calibrates layer by layer and needs tuili's own model "
            f"(tuili.load(...)); got {type(module).__name__}"
        )
    return module
