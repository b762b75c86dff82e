"""Data-error findings and storage counts of loader worker processes, carried with batches.

Sources and stores count in the process that reads: with loader workers that is a worker, whose
counters the training process cannot see. Each batch a worker produces therefore carries what
the worker found since its last batch under ``WORKER_STATS_KEY``: its new bad-data findings (the
training process merges them into its own source's policy, which logs and counts each key once
for the run) and its cumulative storage counts (the exporter sums the latest of every worker).

A forked worker starts with a copy of the training process's counters; :func:`init_loader_worker`
zeroes the storage ones so requests made before the fork are not counted once per worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.utils.data import get_worker_info

from rsdino.data.collate import collate_samples
from rsdino.data.storage import StorageCounters
from rsdino.errors import RsdinoError

if TYPE_CHECKING:  # the sources package imports this module: no runtime import back
    from rsdino.data.sources.decode import BadDataPolicy, Finding

WORKER_STATS_KEY = "_worker_stats"
# A worker's rsdino error travels as a batch under this key: DataLoader itself would re-raise
# it in the training process as a RuntimeError holding the worker's traceback as text.
LOADER_ERROR_KEY = "_loader_error"


def error_batch(error: RsdinoError) -> dict:
    """The batch a worker sends in place of data when reading failed for good."""
    return {LOADER_ERROR_KEY: error}


def in_loader_worker() -> bool:
    return get_worker_info() is not None


def raise_worker_error(batch: dict) -> None:
    """In the training process: raise the original error a worker sent, if this batch is one."""
    if LOADER_ERROR_KEY in batch:
        raise batch[LOADER_ERROR_KEY]


def bad_data_policy(dataset: object) -> BadDataPolicy | None:
    """The bad-data policy of a source (possibly wrapped in ``SkipBadSamples``), if it has one."""
    source = getattr(dataset, "source", dataset)
    return getattr(source, "bad_data", None)


def data_error_counts(dataset: object) -> dict[str, int]:
    """Distinct bad samples per kind this process knows of (its own and merged findings)."""
    policy = bad_data_policy(dataset)
    return {} if policy is None else dict(policy.error_counts)


def _storage_counters(dataset: object) -> StorageCounters | None:
    """The counters of the store a dataset reads: shard streams hold their store, sources the
    store's bound ``read`` method."""
    store = getattr(dataset, "store", None)
    if store is None:
        source = getattr(dataset, "source", dataset)
        store = getattr(getattr(source, "_read_bytes", None), "__self__", None)
    return getattr(store, "counters", None)


def storage_snapshot(dataset: object) -> dict[str, Any] | None:
    """Cumulative ``StorageCounters.snapshot()`` of the store a dataset reads, or None."""
    counters = _storage_counters(dataset)
    return None if counters is None else counters.snapshot()


def init_loader_worker(dataset: object) -> None:
    """In a fresh worker: forget the storage counts inherited from the training process."""
    counters = _storage_counters(dataset)
    if counters is not None:
        counters.reset()


def _take_findings(dataset: object) -> list[Finding]:
    policy = bad_data_policy(dataset)
    if policy is None or not policy.unsent:
        return []
    findings, policy.unsent = policy.unsent, []
    return findings


def attach_worker_stats(batch: dict, dataset: object) -> dict:
    """In a loader worker, add (worker id, stats) to ``batch``; in the main process, nothing."""
    worker = get_worker_info()
    if worker is not None:
        stats = {"findings": _take_findings(dataset), "storage": storage_snapshot(dataset)}
        batch[WORKER_STATS_KEY] = (worker.id, stats)
    return batch


def merge_worker_findings(dataset: object, findings: list[Finding]) -> None:
    """Log and count, in the training process, what a worker found (each key once per run)."""
    policy = bad_data_policy(dataset)
    if policy is not None and findings:
        policy.merge(findings)


def collate_with_worker_stats(samples: list[dict]) -> dict:
    """``collate_samples`` plus the worker's stats (read from the worker's dataset copy)."""
    worker = get_worker_info()
    failed = next((sample for sample in samples if LOADER_ERROR_KEY in sample), None)
    if failed is not None:
        return failed
    batch = collate_samples(samples)
    return batch if worker is None else attach_worker_stats(batch, worker.dataset)
