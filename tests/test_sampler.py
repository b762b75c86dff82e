"""The sample order depends on (seed, epoch) only and resumes at a global position."""

from __future__ import annotations

from itertools import islice

import pytest

from rsdino.data.batch_share import BatchShare
from rsdino.data.sampler import ResumableShuffleSampler


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    stream = list(islice(iter(ResumableShuffleSampler(10, seed=3)), 30))
    epochs = [stream[i : i + 10] for i in (0, 10, 20)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert epochs[0] != epochs[1]


def test_resume_continues_the_same_stream() -> None:
    full = list(islice(iter(ResumableShuffleSampler(7, seed=1)), 25))
    resumed = list(islice(iter(ResumableShuffleSampler(7, seed=1, start_position=12)), 13))
    assert resumed == full[12:]


def test_seed_changes_order() -> None:
    a = list(islice(iter(ResumableShuffleSampler(50, seed=0)), 50))
    b = list(islice(iter(ResumableShuffleSampler(50, seed=1)), 50))
    assert a != b


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        ResumableShuffleSampler(0, seed=0)
    with pytest.raises(ValueError, match="start_position"):
        ResumableShuffleSampler(5, seed=0, start_position=-1)


def test_ranks_split_each_global_batch_and_resume_on_another_world_size() -> None:
    """Two ranks for 3 global batches, then three ranks: together exactly the single stream."""
    batch = 2
    single = list(islice(iter(ResumableShuffleSampler(20, seed=4)), 30))
    two = [
        list(islice(iter(ResumableShuffleSampler(20, seed=4, share=BatchShare(batch, r, 2))), 6))
        for r in range(2)
    ]
    first = [i for k in range(3) for r in range(2) for i in two[r][k * batch : (k + 1) * batch]]
    assert first == single[:12]
    three = [
        list(
            islice(
                iter(
                    ResumableShuffleSampler(
                        20, seed=4, start_position=12, share=BatchShare(batch, r, 3)
                    )
                ),
                batch * 3,
            )
        )
        for r in range(3)
    ]
    second = [i for k in range(3) for r in range(3) for i in three[r][k * batch : (k + 1) * batch]]
    assert first + second == single[:30]
