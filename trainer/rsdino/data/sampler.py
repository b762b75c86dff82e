"""Deterministic, resumable sample order, split across ranks by global batch.

The order is a function of (seed, epoch) only and the position is a global sample index. From a
start position P, global batch k holds positions [P + k*B*W, P + (k+1)*B*W) and rank r takes the
r-th B of them, so a run resumed at the P a checkpoint recorded continues exactly there, whatever
the world size was before and is now.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from rsdino.data.batch_share import BatchShare


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch; identical in every process that asks."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def global_stream(num_samples: int, seed: int, start_position: int) -> Iterator[int]:
    """Dataset indices of the global order, epoch after epoch, from ``start_position`` on."""
    epoch, offset = divmod(start_position, num_samples)
    while True:
        yield from epoch_permutation(num_samples, seed, epoch)[offset:].tolist()
        epoch, offset = epoch + 1, 0


class ResumableShuffleSampler(Sampler[int]):
    """Endless stream of this rank's dataset indices, starting at global ``start_position``."""

    def __init__(
        self,
        num_samples: int,
        seed: int,
        start_position: int = 0,
        share: BatchShare | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty: nothing to sample")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        self.num_samples = num_samples
        self.seed = seed
        self.start_position = start_position
        self.share = share or BatchShare(batch_size=1)  # one rank, one sample per batch

    def __iter__(self) -> Iterator[int]:
        stream = global_stream(self.num_samples, self.seed, self.start_position)
        share = self.share
        while True:
            for _ in range(share.start):
                next(stream)
            for _ in range(share.batch_size):
                yield next(stream)
            for _ in range(share.after):
                next(stream)
