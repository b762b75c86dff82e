"""Data-error and storage counts of loader worker processes, carried to the trainer with batches.

Sources and stores count in the process that reads: with loader workers that is a worker, whose
counters the training process cannot see. Each batch a worker produces therefore carries the
worker's cumulative counts under ``WORKER_STATS_KEY``; the trainer pops them and the metrics
exporter sums the latest counts of every worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import get_worker_info

from rsdino.data.collate import collate_samples

WORKER_STATS_KEY = "_worker_stats"


def data_error_counts(dataset: object) -> Mapping[str, int]:
    """Bad samples per kind counted in this process by a source (through ``SkipBadSamples``)."""
    source = getattr(dataset, "source", dataset)
    return getattr(source, "error_counts", {})


def storage_snapshot(dataset: object) -> dict[str, Any] | None:
    """Cumulative ``StorageCounters.snapshot()`` of the store a dataset reads, or None.

    Packed-shard streams hold their store; sources hold the store's bound ``read`` method.
    """
    store = getattr(dataset, "store", None)
    if store is None:
        source = getattr(dataset, "source", dataset)
        store = getattr(getattr(source, "_read_bytes", None), "__self__", None)
    counters = getattr(store, "counters", None)
    return None if counters is None else counters.snapshot()


def attach_worker_stats(batch: dict, dataset: object) -> dict:
    """In a loader worker, add (worker id, counts) to ``batch``; in the main process, nothing."""
    worker = get_worker_info()
    if worker is not None:
        counts = {
            "data_errors": dict(data_error_counts(dataset)),
            "storage": storage_snapshot(dataset),
        }
        batch[WORKER_STATS_KEY] = (worker.id, counts)
    return batch


def collate_with_worker_stats(samples: list[dict]) -> dict:
    """``collate_samples`` plus the worker's counts (read from the worker's dataset copy)."""
    worker = get_worker_info()
    batch = collate_samples(samples)
    return batch if worker is None else attach_worker_stats(batch, worker.dataset)
