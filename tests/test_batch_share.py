"""One rank's share of the global batch: hand-made rows, and every consumer agreeing on them."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from conftest import multicrop

from rsdino.data.batch_share import BatchShare
from rsdino.data.masking import sample_ibot_masks
from rsdino.data.sampler import ResumableShuffleSampler


def test_rows_positions_and_counts_by_hand() -> None:
    share = BatchShare(batch_size=3, rank=1, world_size=4)
    assert (share.global_batch, share.start, share.stop, share.after) == (12, 3, 6, 6)
    assert share.samples == slice(3, 6)
    # Crop-major: view v of global sample i is row v * 12 + i.
    assert share.view_rows(2).tolist() == [3, 4, 5, 15, 16, 17]
    assert share.view_rows(0).tolist() == []
    assert share.first_position(0) == 3
    assert share.first_position(2, start_position=100) == 100 + 24 + 3


@pytest.mark.parametrize(("batch_size", "rank", "world_size"), [(0, 0, 1), (2, 2, 2), (2, -1, 2)])
def test_impossible_shares_are_rejected(batch_size: int, rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match=r"batch_size|rank"):
        BatchShare(batch_size, rank, world_size)


def test_ranks_partition_every_view_of_the_global_batch() -> None:
    shares = [BatchShare(2, rank, 3) for rank in range(3)]
    rows = torch.cat([share.view_rows(4) for share in shares])
    assert sorted(rows.tolist()) == list(range(4 * 6))


def test_sampler_augment_and_masks_take_the_same_rows() -> None:
    """Each rank's samples, crops and masks are the single process's rows of the global batch."""
    whole_share = BatchShare(4)
    shares = [BatchShare(2, rank, 2) for rank in range(2)]
    order = list(islice(iter(ResumableShuffleSampler(50, seed=1, share=whole_share)), 4))
    for share in shares:
        mine = list(islice(iter(ResumableShuffleSampler(50, seed=1, share=share)), 2))
        assert mine == order[share.samples]

    augment = multicrop(global_crops_size=8, local_crops_size=4, local_crops_number=3)
    images = {"s2": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    whole = augment(images, torch.Generator().manual_seed(7), whole_share)
    masks = sample_ibot_masks(8, (4, 4), (0.1, 0.5), 0.5, torch.Generator().manual_seed(7))
    for share in shares:
        part = augment({"s2": images["s2"][share.samples]}, torch.Generator().manual_seed(7), share)
        for kind, n_views in (("global_crops", 2), ("local_crops", 3)):
            rows = share.view_rows(n_views)
            assert torch.allclose(whole[kind]["s2"][rows], part[kind]["s2"], atol=1e-6)
        global_rows = share.view_rows(2)
        own = sample_ibot_masks(
            8, (4, 4), (0.1, 0.5), 0.5, torch.Generator().manual_seed(7), global_rows
        )
        assert torch.equal(own.masks, masks.masks[global_rows])


def test_augment_rejects_a_share_of_another_size() -> None:
    augment = multicrop(global_crops_size=8, local_crops_size=4, local_crops_number=1)
    with pytest.raises(ValueError, match="share of 3 samples, but 2 images"):
        augment({"s2": torch.zeros(2, 3, 16, 16)}, torch.Generator(), BatchShare(3, 0, 2))
