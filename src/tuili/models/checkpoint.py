"""A folder's safetensors weights, read tensor by tensor.

Each tensor is copied out of its shard's memory map as it is read: a tensor left mapped would keep
the whole shard mapped, and every page of it once read resident, for as long as it lives (a layer
norm kept from shard 1 would hold all of shard 1). So a tensor takes memory while it is alive and
gives it back when dropped, and a checkpoint larger than memory can be read one decoder layer at a
time (tuili.models.lazy). Shards come from `model.safetensors.index.json` where there
is one (each checked to be there), or are every *.safetensors file of the folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from tuili.errors import ModelFormatError

INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # transformers' and the hub's customary shard size


class Checkpoint:
    """The tensors of a folder's safetensors shards: names, shapes and dtypes from the headers
    (read at once, so a truncated or corrupt shard fails here), data on `read`."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.where: dict[str, Path] = {}
        self.meta: dict[str, Tensor] = {}  # name -> a meta tensor of its shape and dtype
        for file in files:
            with _open(file) as f:
                for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                    piece = f.get_slice(name)
                    self.where[name] = file
                    if piece.get_dtype() not in _DTYPES:
                        raise ModelFormatError(
                            f"{file}: {name} is stored as {piece.get_dtype()}, which tuili does not read"
                        )
                    self.meta[name] = torch.empty(piece.get_shape(), dtype=_DTYPES[piece.get_dtype()], device="meta")

    @classmethod
    def find(cls, folder: Path) -> Checkpoint | None:
        """The folder's safetensors checkpoint, or None where it has none (e.g. only *.bin files)."""
        files = safetensors_files(folder)
        return cls(files) if files else None

    def read(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """The named tensors (all where names is None), shard by shard."""
        wanted = list(self.where) if names is None else list(names)
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self.where[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with _open(file) as f:
                for key in keys:
                    try:  # a copy: a tensor mapped from the shard would keep the whole shard mapped
                        out[key] = f.get_tensor(key).clone()
                    except (SafetensorError, OSError, ValueError) as e:
                        raise ModelFormatError(f"{file}: {key} is unreadable ({e}); download the file again") from e
        return out


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: the shards its index lists (each one checked to be there),
    or every *.safetensors file where there is no index."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFormatError(f"{index}: not a safetensors index (no readable weight_map: {e})") from None
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise ModelFormatError(
            f"{index} lists {len(shards)} shards and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {folder}: download the whole checkpoint"
        )
    return [folder / name for name in shards]


def write_shards(state: dict[str, Tensor], folder: Path, max_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write `state` as safetensors files of at most `max_bytes` each (see ShardWriter)."""
    writer = ShardWriter(folder, max_bytes)
    writer.add(state)
    return writer.close()


class ShardWriter:
    """Safetensors shards written as tensors arrive, so that a model is saved one part at a time:
    each file holds at most `max_bytes` (a larger tensor gets a file of its own) and is written
    once full. `close` names them as transformers does (`model.safetensors` where one is enough,
    else numbered shards and the index transformers, vLLM and tuili read)."""

    def __init__(self, folder: Path, max_bytes: int = SHARD_BYTES):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.names: set[str] = set()

    def add(self, tensors: dict[str, Tensor]) -> None:
        for name, t in tensors.items():
            if name in self.names:
                raise ValueError(f"{name} is written twice")
            self.names.add(name)
            nbytes = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max_bytes:
                self._flush()
            self.pending[name] = t
            self.pending_bytes += nbytes
            self.total_bytes += nbytes

    def _flush(self) -> None:
        file = self.folder / f".shard-{len(self.written)}.safetensors"
        save_file(self.pending, str(file), metadata={"format": "pt"})
        self.written.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is pending and give the files their names; returns their paths."""
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            only = self.written[0][0].rename(self.folder / "model.safetensors")
            return [only]
        n = len(self.written)
        shards = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": names for i, (_, names) in enumerate(self.written)}
        for (file, _), name in zip(self.written, shards):
            file.rename(self.folder / name)
        write_index(self.folder, shards, self.total_bytes)
        return [self.folder / name for name in shards]


def write_index(folder: Path, shards: dict[str, list[str]], total_bytes: int) -> None:
    """The `model.safetensors.index.json` that maps every tensor to its shard."""
    weight_map = {name: file for file, names in shards.items() for name in names}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFormatError(f"{file}: corrupt or truncated safetensors file ({e}); download it again") from e


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
