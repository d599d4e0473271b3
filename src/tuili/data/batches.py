"""Training batches: packed token sequences drawn in a seeded order, resumable and shardable.

Text is packed (the token stream cut into full, non-overlapping sequences, so no position is
padding); each epoch visits the sequences in a new seeded order. The sampler's whole state is two
integers, so a checkpoint resumes at exactly the next batch; each of several processes takes its
slice of every global batch, so N processes see what one process with N times the batch sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tuili.data.windows import eval_windows
from tuili.errors import DataError


def packed_sequences(ids: list[int] | Tensor, seq_len: int) -> Tensor:
    """(N, seq_len) consecutive sequences of the token stream; the tail that fills no sequence is dropped."""
    return eval_windows(ids, seq_len)


@dataclass
class BatchSampler:
    """Indices of `batch_size` sequences per call, the order reshuffled (seeded) every epoch; a batch
    never spans two epochs (an epoch's last, partial batch is skipped)."""

    num_sequences: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    index: int = 0  # batches already drawn in this epoch
    _cached: tuple[int, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.num_sequences < self.batch_size:
            raise DataError(
                f"{self.num_sequences} training sequences cannot fill one batch of {self.batch_size}: "
                "give more text, shorter sequences or a smaller batch"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_sequences // self.batch_size

    def next(self) -> Tensor:
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.batch_size
        self.index += 1
        return self._order()[start : start + self.batch_size]

    def _order(self) -> Tensor:
        """This epoch's permutation, drawn once per epoch (seeded by seed + epoch)."""
        if self._cached is None or self._cached[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._cached = (self.epoch, torch.randperm(self.num_sequences, generator=generator))
        return self._cached[1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def shard(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """This process's part of a global batch: every world_size-th row from `rank`."""
    if batch.shape[0] % world_size:
        raise ValueError(f"a global batch of {batch.shape[0]} does not split over {world_size} processes")
    return batch[rank::world_size]


__all__ = ["BatchSampler", "packed_sequences", "shard"]
