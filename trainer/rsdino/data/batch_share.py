"""Which rows of every global batch one rank owns: the one home of that arithmetic.

Ranks take consecutive blocks of ``batch_size`` samples of each global batch, in rank order.
Random draws (crops, masks, dropped modalities) are made for the whole global batch and each rank
keeps its block, so a sample's draws do not depend on how many ranks share the batch; the
sampler and the shard stream hand each rank the samples of the same block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchShare:
    """Rank ``rank`` of ``world_size`` owns samples ``start .. stop - 1`` of each global batch."""

    batch_size: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def start(self) -> int:
        return self.rank * self.batch_size

    @property
    def stop(self) -> int:
        return self.start + self.batch_size

    @property
    def samples(self) -> slice:
        """This rank's samples among draws made for one view of the global batch."""
        return slice(self.start, self.stop)

    @property
    def after(self) -> int:
        """Samples of a global batch that come after this rank's block."""
        return self.global_batch - self.stop

    def view_rows(self, n_views: int) -> torch.Tensor:
        """This rank's rows of a crop-major tensor of ``n_views`` views of the global batch
        (view ``v`` of global sample ``i`` is row ``v * global_batch + i``)."""
        views = torch.arange(n_views)[:, None] * self.global_batch
        return (views + torch.arange(self.start, self.stop)).reshape(-1)

    def first_position(self, batch_index: int, start_position: int = 0) -> int:
        """Global stream position of this rank's first sample in global batch ``batch_index``
        (counted from ``start_position``)."""
        return start_position + batch_index * self.global_batch + self.start
