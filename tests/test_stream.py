"""The shard stream: a canonical order that any world size reads exactly, resumably, from S3 too."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from itertools import groupby, islice
from pathlib import Path

import pytest
import torch
from s3_server import FaultyProxy
from torch.utils.data import DataLoader

from rsdino.data.batch_share import BatchShare
from rsdino.data.pack import pack_dataset
from rsdino.data.storage import LocalStore, S3Store
from rsdino.data.stream import ShardStream
from rsdino.data.synthetic import SyntheticLandCover
from rsdino.errors import RsdinoError

pytest_plugins = ["s3_server"]

NUM_SAMPLES = 50
ALL_KEYS = sorted(f"synthetic/seed0/{i:06d}" for i in range(NUM_SAMPLES))
SEED = 7


def pack_synthetic(store: LocalStore | S3Store) -> None:
    # 50 samples, 4 per chunk (12 full chunks and one of 2), 3 chunks per shard: 5 shards.
    pack_dataset(
        SyntheticLandCover(num_samples=NUM_SAMPLES, tile_size=16),
        store,
        samples_per_chunk=4,
        chunks_per_shard=3,
        description={"source": "synthetic"},
    )


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("packed")
    pack_synthetic(LocalStore(root))
    return root


def chunk_ranges(root: Path) -> dict[str, tuple[str, int, int]]:
    """key -> (shard file, chunk start, chunk end), straight from the shard indexes."""
    located = {}
    for index_path in sorted((root / "shards").glob("*.json")):
        data_key = f"shards/{index_path.stem}.bin"
        for chunk in json.loads(index_path.read_text())["chunks"]:
            span = (data_key, chunk["offset"], chunk["offset"] + chunk["nbytes"])
            located.update({sample["key"]: span for sample in chunk["samples"]})
    return located


def rank_streams(
    store: LocalStore, world_size: int, batch_size: int, **kwargs: object
) -> list[ShardStream]:
    return [
        ShardStream(store, share=BatchShare(batch_size, rank, world_size), seed=SEED, **kwargs)
        for rank in range(world_size)
    ]


def global_keys(streams: list[ShardStream], batches: int) -> list[str]:
    """The keys of ``batches`` global batches: rank 0's part, rank 1's part, ... per batch."""
    iterators = [iter(stream) for stream in streams]
    keys = []
    for _ in range(batches):
        for iterator in iterators:
            keys.extend(next(iterator)["key"])
    return keys


def test_an_epoch_reads_every_sample_once_chunk_by_chunk(packed: Path) -> None:
    (stream,) = rank_streams(LocalStore(packed), 1, batch_size=5)
    keys = global_keys([stream], 20)
    epoch0, epoch1 = keys[:50], keys[50:]
    assert sorted(epoch0) == ALL_KEYS and sorted(epoch1) == ALL_KEYS
    assert epoch0 != epoch1
    # A chunk's samples are consecutive in the stream: 13 chunks give 13 runs per epoch.
    chunk_of = chunk_ranges(packed)
    for epoch in (epoch0, epoch1):
        assert len([run for run, _ in groupby(chunk_of[key] for key in epoch)]) == 13


def test_resume_on_another_world_size_continues_exactly(packed: Path) -> None:
    store = LocalStore(packed)
    batch_size = 3
    first_phase = rank_streams(store, 2, batch_size=batch_size)
    before = global_keys(first_phase, 4)
    position = first_phase[0].position_after(4)
    assert position == 4 * batch_size * 2

    (uninterrupted,) = rank_streams(store, 1, batch_size=batch_size)
    expected = global_keys([uninterrupted], 23)
    for world_size, batches in ((3, 5), (1, 15)):
        resumed = rank_streams(store, world_size, batch_size=batch_size, start_position=position)
        keys = before + global_keys(resumed, batches)
        assert len(keys) == 69
        # Epoch 0 holds every sample exactly once, and epoch 1 has begun without repeats.
        assert sorted(keys[:50]) == ALL_KEYS
        assert len(set(keys[50:])) == 19
        assert keys == expected
        assert resumed[0].position_after(batches) == 69


def test_one_rank_reads_what_two_ranks_read_together(packed: Path) -> None:
    store = LocalStore(packed)
    single = iter(rank_streams(store, 1, batch_size=3)[0])
    pair = [iter(stream) for stream in rank_streams(store, 2, batch_size=3)]
    for _ in range(10):  # crosses the epoch boundary at position 50
        for rank_iterator in pair:
            rank_batch, single_batch = next(rank_iterator), next(single)
            assert rank_batch["key"] == single_batch["key"]
            for name in ("s1", "s2", "landcover", "doy", "label"):
                assert torch.equal(rank_batch[name], single_batch[name])


def test_dataloader_workers_keep_the_batch_order(packed: Path) -> None:
    stream = ShardStream(LocalStore(packed), share=BatchShare(3, 1, 2), seed=SEED, start_position=6)
    inline = list(islice(DataLoader(stream, batch_size=None, num_workers=0), 9))
    workers = list(islice(DataLoader(stream, batch_size=None, num_workers=2), 9))
    assert [batch["key"] for batch in workers] == [batch["key"] for batch in inline]
    for got, expected in zip(workers, inline, strict=True):
        assert torch.equal(got["s2"], expected["s2"]) and got["s2"].dtype == torch.uint16


class RecordingStore(LocalStore):
    """A local store that remembers every byte range read from a shard file."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.ranges: list[tuple[str, int | None, int | None]] = []
        self._record_lock = threading.Lock()

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        if key.endswith(".bin"):
            with self._record_lock:
                self.ranges.append((key, start, end))
        return super().read(key, start, end)


def test_each_chunk_is_read_once_with_one_range_request(packed: Path) -> None:
    store = RecordingStore(packed)
    stream = ShardStream(store, share=BatchShare(5), seed=SEED, read_ahead=1)
    batches = iter(stream)
    keys = [key for batch in islice(batches, 10) for key in batch["key"]]
    batches.close()
    assert sorted(keys) == ALL_KEYS
    reads = Counter(store.ranges)
    # Batches of 5 straddle chunks of 4, yet each chunk is read once per epoch; the read-ahead
    # (4 batches = 20 samples) may already have fetched up to 6 chunks of the next epoch.
    assert set(reads) == set(chunk_ranges(packed).values())
    assert max(reads.values()) <= 2
    assert sum(reads.values()) <= 13 + 6


def test_a_damaged_chunk_is_retried_once_then_named(packed: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(packed, root)
    damaged = root / "shards/shard-000001.bin"
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0xFF
    damaged.write_bytes(bytes(data))

    store = RecordingStore(root)
    stream = ShardStream(store, share=BatchShare(50), seed=SEED)
    with pytest.raises(RsdinoError, match=r"shard shard-000001 .* damaged.*rsdino data pack"):
        next(iter(stream))
    first_chunk = min(span for span in chunk_ranges(root).values() if "000001" in span[0])
    assert Counter(store.ranges)[first_chunk] == 2


def test_missing_dataset_and_modalities_are_clear_errors(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(RsdinoError, match=r"manifest\.json is missing.*rsdino data pack SRC DST"):
        ShardStream(LocalStore(tmp_path), share=BatchShare(2), seed=0)
    with pytest.raises(RsdinoError, match=r"not.*'sar'"):
        ShardStream(LocalStore(packed), share=BatchShare(2), seed=0, modalities=["sar"])
    optical = ShardStream(LocalStore(packed), share=BatchShare(2), seed=0, modalities=["s2"])
    assert set(next(iter(optical))) == {"s2", "landcover", "key", "doy", "label"}


def test_pack_to_s3_and_stream_through_a_faulty_proxy(bucket: str, s3_env: str) -> None:
    pack_synthetic(S3Store(bucket, "packed", endpoint_url=s3_env, path_style=True))
    repack = pack_dataset(
        SyntheticLandCover(num_samples=NUM_SAMPLES, tile_size=16),
        S3Store(bucket, "packed", endpoint_url=s3_env, path_style=True),
        samples_per_chunk=4,
        chunks_per_shard=3,
        description={"source": "synthetic"},
    )
    assert (repack.shards_written, repack.shards_skipped) == (0, 5)

    schedule = [None, "503", None, None, "drop", None, "truncate"]
    with FaultyProxy(s3_env, schedule) as proxy:
        store = S3Store(bucket, "packed", endpoint_url=proxy.url, path_style=True, base_delay=0.001)
        stream = ShardStream(store, share=BatchShare(5), seed=SEED)
        keys = global_keys([stream], 10)
    assert sorted(keys) == ALL_KEYS
    assert proxy.injected["503"] > 0 and proxy.injected["drop"] > 0
    assert store.counters.snapshot()["retries"]["get"] > 0
