"""Training batches from packed shards, in an order that does not depend on the world size.

The canonical stream: epoch e visits every chunk of the dataset once, in a permutation drawn from
(seed, e), and the samples inside chunk c in a permutation drawn from (seed, e, c). Epochs follow
each other endlessly; a sample's "global position" is its index in that stream.

Ranks split the stream by position, never by file: global batch i of a job that started at
position P covers [P + i*B*W, P + (i+1)*B*W) for per-rank batch B and world size W, and rank r takes
the B positions from P + i*B*W + r*B. Together the ranks read every position exactly once, so a job
resumed at the saved position, on any world size, continues with exactly the samples an
uninterrupted job would have seen next.

Reads: each rank (and each DataLoader worker of a rank) reads only the chunks its own positions
fall in, each with one range request, and keeps the current chunk so a chunk spanning two of its
batches is read once. A chunk that straddles the spans of two ranks is read by both, so at worst
every chunk is read twice per epoch; when B is a multiple of samples_per_chunk and the start
position is aligned to chunks, no chunk straddles and every chunk is read once per epoch.
"""

from __future__ import annotations

import itertools
import zlib
from collections import Counter, deque
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from rsdino.data.batch_share import BatchShare
from rsdino.data.collate import collate_samples
from rsdino.data.shards import (
    decode_chunk,
    location,
    read_manifest,
    read_shard_indexes,
)
from rsdino.data.storage import Store
from rsdino.data.worker_stats import attach_worker_stats, error_batch, in_loader_worker
from rsdino.errors import RsdinoError

# Separate random streams for the order of chunks and the order of samples inside a chunk.
_CHUNK_ORDER_STREAM = 0
_SAMPLE_ORDER_STREAM = 1
# (chunk id, index of the sample inside the chunk), for each sample of a per-rank batch.
Plan = list[tuple[int, int]]


@dataclass(frozen=True)
class _ChunkRef:
    """Where one chunk lives and how to decode it."""

    shard: str
    data_key: str
    meta: dict[str, Any]

    @property
    def size(self) -> int:
        return len(self.meta["samples"])


class ShardStream(IterableDataset):
    """Endless collated per-rank batches from a packed dataset, resumable at any global position.

    ``start_position`` is a global sample position; a job saves ``position_after(steps)`` and a
    resumed job passes it back, whatever the new world size. ``modalities`` limits which of the
    packed modalities are decoded (default: all); ``seasonal=(min, max)`` serves the second
    dates that a pack made with that window stores with each sample (``*_b``, ``days_apart``).
    The chunks of the next ``read_ahead`` batches are read and decoded in background threads
    while the current batch is being used. Use it with
    ``DataLoader(stream, batch_size=None, num_workers=n)``: worker w of n produces this stream's
    batches w, w + n, ..., which the DataLoader's round robin over workers puts back in order.
    """

    def __init__(
        self,
        store: Store,
        *,
        share: BatchShare,
        seed: int,
        start_position: int = 0,
        modalities: Collection[str] | None = None,
        read_ahead: int = 4,
        seasonal: tuple[int, int] | None = None,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        if read_ahead < 1:
            raise ValueError(f"read_ahead must be >= 1, got {read_ahead}")
        self.store = store
        self.share = share
        self.seed = seed
        self.start_position = start_position
        self.read_ahead = read_ahead
        self.manifest = read_manifest(store)
        self.modalities = self._check_modalities(modalities)
        self.seasonal = seasonal is not None
        if seasonal is not None:
            self._check_seasonal_window(seasonal)
        packed = self.manifest["modalities"]
        unwanted = set(packed) - set(self.modalities)
        # Without seasonal views a seasonal pack's second dates stay on disk.
        second_dates = {f"{name}_b" for name in (unwanted if self.seasonal else packed)}
        self._arrays = set(self.manifest["arrays"]) - unwanted - second_dates
        self._chunks = self._chunk_table(read_shard_indexes(store, self.manifest))
        self._chunk_sizes = np.array([chunk.size for chunk in self._chunks], dtype=np.int64)
        self.samples_per_epoch = int(self._chunk_sizes.sum())
        if self.samples_per_epoch == 0:
            raise RsdinoError(f"the packed dataset at {store.uri} holds no samples; repack it")
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _check_seasonal_window(self, window: tuple[int, int]) -> None:
        """Seasonal views need a pack made with ``--seasonal-days`` of the same window."""
        packed = self.manifest.get("seasonal")
        if packed is None:
            raise RsdinoError(
                f"the shards at {self.store.uri} were packed without seasonal views; repack with "
                "`rsdino data pack SRC DST --seasonal-days MIN:MAX` or train without them"
            )
        packed_window = (packed["min_days_apart"], packed["max_days_apart"])
        if packed_window != tuple(window):
            raise RsdinoError(
                f"the shards at {self.store.uri} hold second dates "
                f"{packed_window[0]}-{packed_window[1]} days apart, not train.views.seasonal's "
                f"{window[0]}-{window[1]}; set those keys to match or repack with --seasonal-days"
            )

    def _check_modalities(self, modalities: Collection[str] | None) -> list[str]:
        packed = self.manifest["modalities"]
        if modalities is None:
            return list(packed)
        missing = sorted(set(modalities) - set(packed))
        if missing:
            raise RsdinoError(
                f"the packed dataset at {self.store.uri} has modalities {packed}, not {missing}; "
                "pack a source that has them, or train without them"
            )
        return sorted(modalities)

    def _chunk_table(self, indexes: list[dict[str, Any]]) -> list[_ChunkRef]:
        chunks = []
        for entry, index in zip(self.manifest["shards"], indexes, strict=True):
            if index["samples"] != entry["samples"] or index["sha256"] != entry["sha256"]:
                raise RsdinoError(
                    f"{location(self.store, entry['index'])} does not match {entry['name']} in "
                    "the manifest; run `rsdino data pack SRC DST` again to repair the dataset"
                )
            chunks.extend(_ChunkRef(entry["name"], entry["data"], meta) for meta in index["chunks"])
        return chunks

    def position_after(self, batches: int) -> int:
        """The global position after every rank has taken ``batches`` batches from this stream.

        For a job that started at position 0 on one world size this is step * B * W; after a
        resume on another world size, save this value rather than recomputing step * B * W.
        """
        return self.start_position + batches * self.share.global_batch

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s chunk order and the position (within the epoch) where each ends."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, _CHUNK_ORDER_STREAM])
            order = rng.permutation(len(self._chunks))
            self._epoch_cache = (epoch, order, np.cumsum(self._chunk_sizes[order]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _sample_order(self, epoch: int, chunk_id: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, _SAMPLE_ORDER_STREAM, chunk_id])
        return rng.permutation(int(self._chunk_sizes[chunk_id]))

    def _batch_plan(self, batch: int) -> Plan:
        """The samples of this rank's part of global batch ``batch`` (counted from the start)."""
        position = self.share.first_position(batch, self.start_position)
        plan: Plan = []
        while len(plan) < self.share.batch_size:
            epoch, offset = divmod(position, self.samples_per_epoch)
            order, ends = self._epoch_layout(epoch)
            slot = int(np.searchsorted(ends, offset, side="right"))
            chunk_id = int(order[slot])
            first = offset - int(ends[slot] - self._chunk_sizes[chunk_id])
            count = min(self.share.batch_size - len(plan), int(ends[slot]) - offset)
            picked = self._sample_order(epoch, chunk_id)[first : first + count]
            plan.extend((chunk_id, int(record)) for record in picked)
            position += count
        return plan

    def _load_chunk(self, chunk_id: int) -> list[dict[str, Any]]:
        """One range read, checked against the chunk's CRC-32 (once more on a mismatch), decoded.

        CRC-32 rather than sha256: it catches transfer and storage corruption at a quarter of
        the CPU cost, which matters on the host-side hot path; shards keep their sha256.
        """
        chunk = self._chunks[chunk_id]
        start = chunk.meta["offset"]
        for _ in range(2):
            data = self.store.read(chunk.data_key, start, start + chunk.meta["nbytes"])
            if zlib.crc32(data) == chunk.meta["crc32"]:
                return decode_chunk(data, chunk.meta, self._arrays, fields=self.seasonal)
        raise RsdinoError(
            f"shard {chunk.shard} ({location(self.store, chunk.data_key)}) is damaged: bytes "
            f"[{start}, {start + chunk.meta['nbytes']}) fail their CRC-32 check twice; run "
            "`rsdino data pack SRC DST` again to repair it"
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._batches()
        except RsdinoError as error:
            if not in_loader_worker():
                raise
            yield error_batch(error)

    def _batches(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        plans = map(self._batch_plan, itertools.count(worker_id, num_workers))
        pool = ThreadPoolExecutor(self.read_ahead, thread_name_prefix="rsdino-shards")
        # Up to read_ahead batches are planned ahead and their chunks read in the pool, so
        # decoding overlaps I/O; a chunk needed by several of those batches is read once.
        ahead: deque[Plan] = deque()
        reads: dict[int, Future[list[dict[str, Any]]]] = {}
        users: Counter[int] = Counter()
        current: tuple[int, list[dict[str, Any]]] = (-1, [])
        try:
            for plan in plans:
                for chunk_id in {chunk_id for chunk_id, _ in plan}:
                    if chunk_id not in reads:
                        reads[chunk_id] = pool.submit(self._load_chunk, chunk_id)
                    users[chunk_id] += 1
                ahead.append(plan)
                if len(ahead) > self.read_ahead:
                    served = ahead.popleft()
                    batch, current = self._serve(served, reads, current)
                    for chunk_id in {chunk_id for chunk_id, _ in served}:
                        users[chunk_id] -= 1
                        if not users[chunk_id]:
                            del users[chunk_id], reads[chunk_id]
                    yield attach_worker_stats(batch, self)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _serve(
        plan: Plan,
        reads: dict[int, Future[list[dict[str, Any]]]],
        current: tuple[int, list[dict[str, Any]]],
    ) -> tuple[dict[str, Any], tuple[int, list[dict[str, Any]]]]:
        """Collate a planned batch; ``current`` is the chunk the previous sample came from."""
        samples = []
        for chunk_id, record in plan:
            if chunk_id != current[0]:
                current = (chunk_id, reads[chunk_id].result())
            samples.append(current[1][record])
        return collate_samples(samples), current
