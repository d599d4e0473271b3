"""A disk cache of the teacher's logits, so that epochs after the first (and later runs on the same
data) skip the teacher's forward pass.

Full logits are V floats per token (49,152 for SmolLM2: 192 KiB), so the cache keeps each
position's top-k logits, their ids and the log-sum-exp at the distillation temperature
(`TopKLogits`, about 0.5 KiB per token at k = 64); the soft loss then compares the k tokens and
"the rest". Entries are keyed by a hash of the sequence's tokens, one safetensors file per
sequence written through a temporary name; `meta.json` names the teacher (a hash of its weights),
the temperature and k, and a cache made for another teacher is refused, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tuili.distill.losses import TopKLogits
from tuili.distill.students import DistillError
from tuili.models.io import atomic_file


def fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes): two modules agree iff equal."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class LogitsCache:
    """Top-k teacher logits per sequence, under `folder`."""

    def __init__(self, folder: str | Path, teacher: nn.Module, temperature: float, top_k: int):
        self.folder = Path(folder)
        self.top_k, self.temperature = top_k, temperature
        meta = {"teacher": fingerprint(teacher), "temperature": temperature, "top_k": top_k, "format": 1}
        meta_file = self.folder / "meta.json"
        if meta_file.is_file():
            found = json.loads(meta_file.read_text())
            if found != meta:
                differ = [k for k in meta if found.get(k) != meta[k]]
                raise DistillError(
                    f"{self.folder} holds logits made with another {' and '.join(differ)}: "
                    "give another --logits-cache folder or delete this one"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic(meta_file, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
        self.hits = self.misses = 0

    def _path(self, sequence: Tensor) -> Path:
        key = hashlib.sha256(sequence.to(torch.int64).cpu().numpy().tobytes()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, batch: Tensor) -> TopKLogits | None:
        """The cached logits of every sequence of `batch` (B, T), or None if any is missing."""
        paths = [self._path(row) for row in batch]
        if not all(p.is_file() for p in paths):
            self.misses += len(paths)
            return None
        self.hits += len(paths)
        parts = [load_file(str(p)) for p in paths]
        return TopKLogits(
            *(torch.stack([part[k] for part in parts]).to(batch.device) for k in ("values", "indices", "logsumexp"))
        )

    def put(self, batch: Tensor, logits: TopKLogits) -> None:
        for i, row in enumerate(batch):
            path = self._path(row)
            if path.is_file():
                continue
            path.parent.mkdir(exist_ok=True)
            tensors = {
                "values": logits.values[i],
                "indices": logits.indices[i].to(torch.int32),
                "logsumexp": logits.logsumexp[i],
            }
            tensors = {
                k: v.detach().float().cpu().contiguous() if k != "indices" else v.cpu().contiguous()
                for k, v in tensors.items()
            }
            _atomic(path, lambda tmp, tensors=tensors: save_file(tensors, tmp))


def _atomic(path: Path, write) -> None:
    with atomic_file(path) as tmp:
        write(str(tmp))


__all__ = ["LogitsCache", "fingerprint"]
