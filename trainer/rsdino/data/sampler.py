"""Deterministic, resumable sample order.

The order is a function of (seed, epoch) only and the position is a global sample index, so a
resumed run continues with exactly the samples an uninterrupted run would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch; identical in every process that asks."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class ResumableShuffleSampler(Sampler[int]):
    """Endless stream of dataset indices, epoch after epoch, starting at ``start_position``."""

    def __init__(self, num_samples: int, seed: int, start_position: int = 0) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty: nothing to sample")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        self.num_samples = num_samples
        self.seed = seed
        self.start_position = start_position

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start_position, self.num_samples)
        while True:
            order = epoch_permutation(self.num_samples, self.seed, epoch)
            yield from order[offset:].tolist()
            epoch, offset = epoch + 1, 0
