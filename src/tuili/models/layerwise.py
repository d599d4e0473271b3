"""Layer-by-layer calibration, shared by quantization and pruning: see what each linear layer
receives, one decoder layer at a time, and the statistics methods keep of it.

Sequential (as GPTQ and llm-compressor do): calibration samples run through the embedding, then
through each decoder layer in turn; a layer is quantized (or pruned) from what it received, and
its new output is what the next layer receives. Only one layer's inputs are held at a time, and a
lazily loaded model's layer is read from disk only when its turn comes (tuili.models.lazy), so
memory stays bounded whatever the model's depth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm import tqdm

from tuili.models.lazy import offload, on_disk, onload
from tuili.models.llama import LlamaForCausalLM
from tuili.models.memory import return_freed_memory


@contextmanager
def input_hooks(modules: Mapping[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
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


class Hessian:
    """Running H = 2/n Σ x xᵀ over the rows x of a layer's inputs, summed in fp32 in place (as
    llm-compressor does): a 14336-input layer's H is 0.8 GB and no batch makes a second one."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features)
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.T, x)
        self.count += x.shape[0]

    def value(self) -> Tensor:
        return self.h.mul(2 / max(self.count, 1))


class LayerRunner:
    """Runs calibration samples (N, T) through a LlamaForCausalLM one decoder layer at a time."""

    def __init__(self, module: LlamaForCausalLM, calib: Tensor, batch_size: int = 8):
        self.module, self.batch_size = module, batch_size
        device = module.device
        calib = calib.to(device)
        with torch.no_grad():
            self.hidden = module.embed(calib)  # (N, T, H)
        n, t = calib.shape
        self.positions = torch.arange(t, device=device).expand(n, t)
        self.rope = module.rotary_emb(self.positions[:1], self.hidden.dtype)
        local = module.rotary_emb_local
        self.local_rope = self.rope if local is None else local(self.positions[:1], self.hidden.dtype)

    @torch.no_grad()
    def run(self, layer: nn.Module) -> Tensor:
        """The layer's output for every sample (hooks on its linears see all inputs)."""
        outs = []
        for start in range(0, self.hidden.shape[0], self.batch_size):
            x = self.hidden[start : start + self.batch_size]
            b = x.shape[0]
            cos, sin = self.local_rope if layer.self_attn.local_rope else self.rope
            out, _ = layer(x, self.positions[:b], cos.expand(b, -1, -1), sin.expand(b, -1, -1), None, False)
            outs.append(out)
        return torch.cat(outs)

    def layers(self, desc: str, progress: bool = True, put_back: bool = False) -> Iterator[tuple[int, nn.Module]]:
        """Yield (index, layer), read from disk first where the model is lazy; after the caller has
        changed the layer, its output feeds the next. `put_back`: a layer read for this pass goes
        back on disk after it (a pass that only reads the layers holds one at a time)."""
        layers = self.module.model.layers
        pending = on_disk(self.module) if put_back else set()
        for i, layer in enumerate(tqdm(layers, desc=desc, unit="layer", disable=not progress, leave=False)):
            onload(self.module, i)
            yield i, layer
            self.hidden = self.run(layer)
            if i in pending:
                offload(self.module, i)
            return_freed_memory()  # the layer's float weights and temporaries, freed in the heap


def first_rows(
    runner: LayerRunner, layer: nn.Module, modules: Mapping[str, nn.Module], limit: int
) -> dict[str, Tensor]:
    """The first `limit` input rows of each module, from one pass over the calibration set."""
    rows: dict[str, list[Tensor]] = {n: [] for n in modules}

    def keep(name, x):
        have = sum(r.shape[0] for r in rows[name])
        if have < limit:
            rows[name].append(x[: limit - have].detach().float().clone())

    with input_hooks(modules, keep):
        runner.run(layer)
    return {n: torch.cat(r) for n, r in rows.items()}


def require_tuili_model(module: nn.Module, method: str) -> LlamaForCausalLM:
    if not isinstance(module, LlamaForCausalLM):
        raise ValueError(
            f"{method} calibrates layer by layer and needs tuili's own model "
            f"(tuili.load(...)); got {type(module).__name__}"
        )
    return module
