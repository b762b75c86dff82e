"""Counts kept in loader workers (bad tiles, storage traffic) reach the metrics exporter."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from metrics_fixtures import enabled_config, free_port, scrape, value
from source_fixtures import write_sen12ms_tree
from torch.utils.data import DataLoader

from rsdino.data.sources import Sen12MSSource, SkipBadSamples, store_access
from rsdino.data.storage import LocalStore
from rsdino.data.worker_stats import (
    WORKER_STATS_KEY,
    collate_with_worker_stats,
    data_error_counts,
    merge_worker_findings,
)
from rsdino.train.dist import DistContext
from rsdino.train.metrics import StepCost, start_metrics
from rsdino.train.runtime import resolve_device


def test_worker_counts_are_summed_into_the_exporter(tmp_path: Path) -> None:
    files = write_sen12ms_tree(tmp_path / "tree")
    corrupt = next(key for key in sorted(files) if "/S2/" in key)
    (tmp_path / "tree" / corrupt).write_bytes(b"not a tiff")
    source = Sen12MSSource(*store_access(LocalStore(tmp_path / "tree")))
    loader = DataLoader(
        SkipBadSamples(source), batch_size=2, num_workers=2, collate_fn=collate_with_worker_stats
    )

    port = free_port()
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=resolve_device("cpu"))
    metrics = start_metrics(enabled_config(port), ctx, "test", StepCost(flops=0.0, tokens=0))
    metrics.watch_data(loader.dataset)
    try:
        workers = set()
        for batch in loader:
            worker_id, stats = batch.pop(WORKER_STATS_KEY)
            workers.add(worker_id)
            merge_worker_findings(loader.dataset, stats["findings"])
            metrics.observe_worker_stats(worker_id, stats)
        metrics.observe_interval(
            {"total": 1.0}, {"lr": 0, "wd": 0, "momentum": 0, "teacher_temp": 1}
        )
        samples = scrape(metrics.url)
    finally:
        metrics.close()

    assert workers == {0, 1}
    assert value(samples, "rsdino_data_errors_total", kind="corrupt") == 1
    # 6 pairs = 12 files read through the workers' stores (plus the corrupt one's retry-free read).
    reads = value(samples, "rsdino_storage_requests_total", operation="get", status="ok")
    assert reads >= 12
    assert value(samples, "rsdino_storage_bytes_total", direction="read") > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_each_bad_tile_is_counted_and_logged_once_whatever_the_worker_count(
    tmp_path: Path, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue: 2 workers counted corrupt 4 / missing_partner 3 where 0 workers counted 2 / 1."""
    files = write_sen12ms_tree(tmp_path / "tree")
    s2_keys = sorted(key for key in files if "/S2/" in key)
    s1_keys = sorted(key for key in files if "/S1/" in key)
    for key in s2_keys[:2]:
        (tmp_path / "tree" / key).write_bytes(b"not a tiff")
    (tmp_path / "tree" / s1_keys[-1]).unlink()  # its S2 partner is left alone
    caplog.set_level(logging.WARNING)
    dataset = SkipBadSamples(Sen12MSSource(*store_access(LocalStore(tmp_path / "tree"))))
    loader = DataLoader(
        dataset,
        batch_size=2,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate_with_worker_stats,
    )
    for _epoch in range(3):  # every worker meets every bad tile sooner or later
        for batch in loader:
            if WORKER_STATS_KEY in batch:
                merge_worker_findings(dataset, batch.pop(WORKER_STATS_KEY)[1]["findings"])
    assert data_error_counts(dataset) == {"corrupt": 2, "missing_partner": 1}
    logged = [record.getMessage() for record in caplog.records]
    for key in s2_keys[:2]:
        assert sum(key in line for line in logged) == 1, logged
