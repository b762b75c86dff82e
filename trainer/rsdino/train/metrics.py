"""Prometheus metrics of a training run, served over HTTP by every rank.

Each rank serves its own ``/metrics`` on ``metrics.port + local_rank`` so several ranks can share
a pod; every sample carries ``rank``, ``local_rank``, ``node`` and ``job`` labels (scrape with
``honor_labels: true`` so Prometheus keeps that ``job``). Values are updated from numbers the loop
already has on the host: nothing here adds a device sync. Throughput is a counter; ask Prometheus
for ``rate()`` rather than exporting a rate.

``rsdino_mfu_ratio`` is only exported when ``metrics.peak_flops_per_device`` is set (> 0): with an
unknown peak (e.g. on CPU) the family has no sample at all. ``rsdino_gpu_memory_bytes`` is only
exported on CUDA. The storage families count what the training process itself reads through a
packed-shard store (the manifest and, with ``num_workers=0``, every chunk); loader worker
processes keep their own counts, which do not reach this exporter.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from torch import nn

from rsdino import __version__
from rsdino.data.build import cloudy_left_out, cloudy_marked
from rsdino.data.sources.decode import DataError
from rsdino.data.worker_stats import data_error_counts, storage_snapshot
from rsdino.errors import RsdinoError
from rsdino.train.dist import DistContext

log = logging.getLogger("rsdino")

BASE_LABELS = ("rank", "local_rank", "node", "job")
LOSS_COMPONENTS = ("dino_global", "dino_local", "ibot", "koleo", "total")
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DATA_WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Every kind a source can count, exported at 0 from the start so rate() sees the first error.
DATA_ERROR_KINDS = (DataError.kind, *(cls.kind for cls in DataError.__subclasses__()), "nan_filled")


# --- Analytical cost of one training step ---------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """Per-rank work of one step: matmul FLOPs and image patch tokens through the student."""

    flops: float
    tokens: int


def estimate_step_cost(cfg: DictConfig, student: nn.ModuleDict, executed: bool = False) -> StepCost:
    """FLOPs of one rank's step: student forward + backward (3x forward) and teacher forward.

    The student sees the global and local crops, the teacher the global crops; both DINO heads
    see every [CLS] token they produce and, with iBOT on, the iBOT head sees the expected number
    of masked patches. The encoder and heads report their own FLOPs (``forward_flops``,
    ``flops_per_token``): multimodal runs count each modality's ViT, the fusion layers are left
    out. The teacher has the student's shapes.

    ``executed=True`` counts what the step really runs: the student's blocks with subset
    stochastic depth run their residual branches on ``Block.branch_rows`` of the 2B global (and
    of the n_local*B local) crops they see at once, an exact per-batch count; the teacher, in
    eval mode, runs in full.
    """
    encoder = student["encoder"]
    batch, patch = cfg.train.batch_size_per_gpu, encoder.patch_size
    global_size, local_size = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    global_patches = (global_size // patch) ** 2
    local_patches = (local_size // patch) ** 2
    n_global, n_local = 2 * batch, cfg.crops.local_crops_number * batch
    dino_token = student["dino_head"].flops_per_token()
    ibot_head = student["ibot_head"] if "ibot_head" in student else student["dino_head"]
    ibot_token = ibot_head.flops_per_token()
    masked = 0.0
    if cfg.ibot.loss_weight > 0:
        low, high = cfg.ibot.mask_ratio_min_max
        masked = n_global * global_patches * cfg.ibot.mask_sample_probability * (low + high) / 2
    teacher_encoder = encoder.forward_flops(global_size)
    teacher = n_global * (teacher_encoder + dino_token) + masked * ibot_token
    local_encoder = encoder.forward_flops(local_size, executed, batch=n_local) if n_local else 0.0
    student_flops = (
        n_global * encoder.forward_flops(global_size, executed, batch=n_global)
        + n_local * local_encoder
        + (n_global + n_local) * dino_token
        + masked * ibot_token
    )
    tokens = len(encoder.backbones) * (n_global * global_patches + n_local * local_patches)
    return StepCost(flops=3 * student_flops + teacher, tokens=tokens)


# --- The exporter ---------------------------------------------------------------------------


def _counts_delta(seen: dict[Any, int], current: Mapping[Any, int]) -> dict[Any, int]:
    """Increments since the last look at a cumulative count table; never negative."""
    delta = {}
    for key, value in current.items():
        step = value - seen.get(key, 0)
        if step > 0:
            delta[key] = step
            seen[key] = value
    return delta


def _sum_snapshots(snapshots: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Add up ``StorageCounters.snapshot()`` tables of several processes."""
    requests: collections.Counter[Any] = collections.Counter()
    retries: collections.Counter[str] = collections.Counter()
    for snapshot in snapshots:
        requests.update(snapshot["requests"])
        retries.update(snapshot["retries"])
    return {
        "requests": dict(requests),
        "retries": dict(retries),
        "bytes_read": sum(snapshot["bytes_read"] for snapshot in snapshots),
        "bytes_written": sum(snapshot["bytes_written"] for snapshot in snapshots),
    }


class TrainingMetrics:
    """The metric families of one rank, in their own registry, served over HTTP."""

    def __init__(self, settings: DictConfig, ctx: DistContext, cost: StepCost, preset: str) -> None:
        self.registry = CollectorRegistry()
        self.base = {
            "rank": str(ctx.rank),
            "local_rank": str(ctx.local_rank),
            "node": socket.gethostname(),
            "job": settings.job,
        }
        self.device = ctx.device
        self.cost = cost
        self.peak_flops = settings.peak_flops_per_device
        self._dataset: object = None
        self._worker_counts: dict[int, Mapping[str, Any]] = {}
        self._seen_errors: dict[str, int] = {}
        self._seen_storage: dict[tuple[str, ...], int] = {}
        self._interval_steps, self._interval_seconds = 0, 0.0
        self._define_families()
        self._set_run_info(ctx, preset)
        host, ports = metrics_address(settings, ctx)
        self._server, self._thread, self.port = self._serve(host, ports, settings, ctx)
        shown = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
        self.url = f"http://{shown}:{self.port}/metrics"

    def _serve(
        self, host: str, ports: range, settings: DictConfig, ctx: DistContext
    ) -> tuple[Any, Any, int]:
        error: OSError | None = None
        for port in ports:
            try:
                return (*start_http_server(port, addr=host, registry=self.registry), port)
            except OSError as exc:
                error = exc
        assert error is not None
        tried = f"port {ports[0]}" if len(ports) == 1 else f"ports {ports[0]}-{ports[-1]}"
        setting = "null" if settings.port is None else settings.port
        raise RsdinoError(
            f"metrics {tried} (metrics.port={setting} + local rank {ctx.local_rank}) on {host} "
            f"is unavailable ({error.strerror}); set metrics.port to a free range or "
            "metrics.enabled=false"
        ) from error

    def _family(
        self, kind: type, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any
    ) -> Any:
        return kind(name, doc, (*BASE_LABELS, *labels), registry=self.registry, **kw)

    def _define_families(self) -> None:
        family = self._family
        self.loss = family(
            Gauge, "rsdino_loss", "Loss parts, interval mean over ranks", ("component",)
        )
        self.step = family(Gauge, "rsdino_step", "Completed optimisation steps")
        self.steps = family(Counter, "rsdino_steps_total", "Steps completed by this process")
        self.samples = family(Counter, "rsdino_samples_total", "Samples trained on by this rank")
        self.tokens = family(
            Counter, "rsdino_tokens_total", "Image patch tokens through this rank's student"
        )
        self.step_seconds = family(
            Histogram,
            "rsdino_step_duration_seconds",
            "Host wall time of one step, data wait included",
            buckets=STEP_BUCKETS,
        )
        self.data_wait = family(
            Histogram,
            "rsdino_data_wait_seconds",
            "Time blocked waiting for the next batch",
            buckets=DATA_WAIT_BUCKETS,
        )
        self.lr = family(Gauge, "rsdino_learning_rate", "Scheduled peak learning rate")
        self.wd = family(Gauge, "rsdino_weight_decay", "Scheduled weight decay")
        self.momentum = family(Gauge, "rsdino_teacher_momentum", "Teacher EMA momentum")
        self.temperature = family(Gauge, "rsdino_teacher_temperature", "Teacher softmax temp")
        self.mfu = family(Gauge, "rsdino_mfu_ratio", "Model FLOPs utilisation over the interval")
        self.gpu_memory = family(
            Gauge, "rsdino_gpu_memory_bytes", "CUDA memory of this rank's device", ("kind",)
        )
        self.world_size = family(Gauge, "rsdino_world_size", "Ranks in the job")
        self.restarts = family(Gauge, "rsdino_restarts", "Elastic restarts of the job so far")
        self.resumed_from = family(
            Gauge, "rsdino_resumed_from_step", "Checkpoint step resumed from (0: fresh start)"
        )
        self.checkpoint_seconds = family(
            Histogram,
            "rsdino_checkpoint_save_duration_seconds",
            "Wall time from the start of a save to its commit (background writing included)",
            buckets=CHECKPOINT_BUCKETS,
        )
        self.checkpoint_stall = family(
            Histogram,
            "rsdino_checkpoint_stall_seconds",
            "Time a save blocked the training loop (staging; the whole write when sync)",
            buckets=CHECKPOINT_BUCKETS,
        )
        self.checkpoint_failures = family(
            Counter,
            "rsdino_checkpoint_failures_total",
            "Checkpoint saves that failed and were skipped",
        )
        self.checkpoint_step = family(
            Gauge, "rsdino_last_checkpoint_step", "Step of the last complete checkpoint"
        )
        self.checkpoint_time = family(
            Gauge, "rsdino_last_checkpoint_timestamp_seconds", "When it completed (Unix time)"
        )
        self.data_errors = family(
            Counter, "rsdino_data_errors_total", "Bad samples skipped, by kind", ("kind",)
        )
        self.cloudy_left_out = family(
            Gauge,
            "rsdino_data_cloudy_left_out",
            "Acquisitions train.clouds left out of the dataset at start (cloud fraction too high)",
        )
        self.cloudy_kept = family(
            Gauge,
            "rsdino_data_cloudy_kept",
            "Cloudy acquisitions kept and flagged (train.clouds.policy sar_only or weight)",
        )
        self.seasonal_pairs = family(
            Gauge,
            "rsdino_seasonal_pair_fraction",
            "Share of samples whose global crops came from two dates (train.views.seasonal)",
        )
        self.seasonal_days = family(
            Gauge,
            "rsdino_seasonal_days_apart",
            "Mean days between the two dates of the seasonal samples of the last interval",
        )
        self.storage_requests = family(
            Counter,
            "rsdino_storage_requests_total",
            "Storage requests by outcome",
            ("operation", "status"),
        )
        self.storage_bytes = family(
            Counter, "rsdino_storage_bytes_total", "Bytes moved to or from storage", ("direction",)
        )
        self.storage_retries = family(
            Counter, "rsdino_storage_retries_total", "Storage request retries", ("operation",)
        )
        self.eval_knn = family(
            Gauge,
            "rsdino_eval_knn_accuracy",
            "Top-1 kNN accuracy of the teacher on the held-out set (evaluation.*)",
            ("k",),
        )
        self.eval_step = family(Gauge, "rsdino_eval_step", "Step of the latest periodic evaluation")
        self.build_info = family(
            Gauge,
            "rsdino_build_info",
            "Versions of this run (always 1)",
            ("version", "torch", "preset"),
        )

    def _set_run_info(self, ctx: DistContext, preset: str) -> None:
        base = self.base
        self.build_info.labels(
            **base, version=__version__, torch=torch.__version__, preset=preset
        ).set(1)
        self.world_size.labels(**base).set(ctx.world_size)
        self.restarts.labels(**base).set(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
        self.resumed_from.labels(**base).set(0)
        for family in (self.steps, self.samples, self.tokens, self.step_seconds, self.data_wait):
            family.labels(**base)  # zero-valued from the first scrape, so rate() has a start
        for family in (self.checkpoint_seconds, self.checkpoint_stall, self.checkpoint_failures):
            family.labels(**base)
        for kind in DATA_ERROR_KINDS:
            self.data_errors.labels(**base, kind=kind)

    def set_resumed_from(self, step: int) -> None:
        self.resumed_from.labels(**self.base).set(step)

    def watch_data(self, dataset: object) -> None:
        """Read data-error and storage counts from ``dataset`` at every interval."""
        self._dataset = dataset
        self.cloudy_left_out.labels(**self.base).set(cloudy_left_out(dataset))
        self.cloudy_kept.labels(**self.base).set(cloudy_marked(dataset))

    def observe_step(self, step: int, samples: int, data_wait: float, duration: float) -> None:
        """After each step, from host timers only: ``step`` is the number of completed steps."""
        base = self.base
        self.step.labels(**base).set(step)
        self.steps.labels(**base).inc()
        self.samples.labels(**base).inc(samples)
        self.tokens.labels(**base).inc(self.cost.tokens)
        self.data_wait.labels(**base).observe(data_wait)
        self.step_seconds.labels(**base).observe(duration)
        self._interval_steps += 1
        self._interval_seconds += duration

    def observe_interval(self, losses: Mapping[str, float], scalars: Mapping[str, float]) -> None:
        """At log intervals: losses (already on the host), schedules, MFU, memory, data counts."""
        base = self.base
        for component, value in losses.items():
            self.loss.labels(**base, component=component).set(value)
        self.lr.labels(**base).set(scalars["lr"])
        self.wd.labels(**base).set(scalars["wd"])
        self.momentum.labels(**base).set(scalars["momentum"])
        self.temperature.labels(**base).set(scalars["teacher_temp"])
        if self.peak_flops > 0 and self._interval_seconds > 0:
            achieved = self.cost.flops * self._interval_steps / self._interval_seconds
            self.mfu.labels(**base).set(achieved / self.peak_flops)
        self._interval_steps, self._interval_seconds = 0, 0.0
        if self.device.type == "cuda":
            self._update_gpu_memory()
        self._update_data_counts()

    def observe_worker_stats(self, worker_id: int, counts: Mapping[str, Any]) -> None:
        """The latest cumulative counts of one loader worker (they travel with its batches)."""
        self._worker_counts[worker_id] = counts

    def _update_data_counts(self) -> None:
        """Bad samples as the training process knows them (workers' findings are merged into
        its source), storage requests summed over it and every worker's latest counts."""
        snapshots = [counts["storage"] for counts in self._worker_counts.values()]
        if self._dataset is not None:
            self.update_data_errors(data_error_counts(self._dataset))
            snapshots.append(storage_snapshot(self._dataset))
        snapshots = [snapshot for snapshot in snapshots if snapshot is not None]
        if snapshots:
            self.update_storage(_sum_snapshots(snapshots))

    def _update_gpu_memory(self) -> None:
        device, base = self.device, self.base
        gauge = self.gpu_memory
        gauge.labels(**base, kind="allocated").set(torch.cuda.memory_allocated(device))
        gauge.labels(**base, kind="reserved").set(torch.cuda.memory_reserved(device))
        gauge.labels(**base, kind="peak").set(torch.cuda.max_memory_allocated(device))

    def update_data_errors(self, counts: Mapping[str, int]) -> None:
        """``counts``: cumulative bad samples per kind, as a source's ``error_counts``."""
        for kind, increment in _counts_delta(self._seen_errors, counts).items():
            self.data_errors.labels(**self.base, kind=kind).inc(increment)

    def update_storage(self, snapshot: Mapping[str, Any]) -> None:
        """``snapshot``: cumulative counts shaped like ``StorageCounters.snapshot()``."""
        base, seen = self.base, self._seen_storage
        requests = {("request", op, status): n for (op, status), n in snapshot["requests"].items()}
        for (_, operation, status), n in _counts_delta(seen, requests).items():
            self.storage_requests.labels(**base, operation=operation, status=status).inc(n)
        moved = {
            ("bytes", "read"): snapshot["bytes_read"],
            ("bytes", "write"): snapshot["bytes_written"],
        }
        for (_, direction), n in _counts_delta(seen, moved).items():
            self.storage_bytes.labels(**base, direction=direction).inc(n)
        retries = {("retry", op): n for op, n in snapshot["retries"].items()}
        for (_, operation), n in _counts_delta(seen, retries).items():
            self.storage_retries.labels(**base, operation=operation).inc(n)

    def observe_checkpoint_stall(self, seconds: float) -> None:
        """The training loop's wait inside one save call."""
        self.checkpoint_stall.labels(**self.base).observe(seconds)

    def observe_checkpoint(self, step: int, seconds: float, committed: bool) -> None:
        """A save ended: committed (complete on storage) or failed and skipped."""
        base = self.base
        if not committed:
            self.checkpoint_failures.labels(**base).inc()
            return
        self.checkpoint_seconds.labels(**base).observe(seconds)
        self.checkpoint_step.labels(**base).set(step)
        self.checkpoint_time.labels(**base).set(time.time())

    def observe_views(self, views: Mapping[str, float]) -> None:
        """Interval means of the seasonal-view statistics (over steps and ranks)."""
        self.seasonal_pairs.labels(**self.base).set(views["seasonal_pairs"])
        self.seasonal_days.labels(**self.base).set(views["seasonal_days_apart"])

    def observe_eval(self, step: int, knn_accuracy: Mapping[int, float]) -> None:
        """A periodic evaluation finished (rank 0 only: it holds the gathered result)."""
        for k, value in knn_accuracy.items():
            self.eval_knn.labels(**self.base, k=str(k)).set(value)
        self.eval_step.labels(**self.base).set(step)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class DisabledMetrics:
    """``metrics.enabled=false``: the same calls, doing nothing (no server, no registry)."""

    url = None

    def set_resumed_from(self, step: int) -> None:
        pass

    def watch_data(self, dataset: object) -> None:
        pass

    def observe_eval(self, step: int, knn_accuracy: Mapping[int, float]) -> None:
        pass

    def observe_views(self, views: Mapping[str, float]) -> None:
        pass

    def observe_worker_stats(self, worker_id: int, counts: Mapping[str, Any]) -> None:
        pass

    def observe_step(self, step: int, samples: int, data_wait: float, duration: float) -> None:
        pass

    def observe_interval(self, losses: Mapping[str, float], scalars: Mapping[str, float]) -> None:
        pass

    def update_data_errors(self, counts: Mapping[str, int]) -> None:
        pass

    def update_storage(self, snapshot: Mapping[str, Any]) -> None:
        pass

    def observe_checkpoint_stall(self, seconds: float) -> None:
        pass

    def observe_checkpoint(self, step: int, seconds: float, committed: bool) -> None:
        pass

    def close(self) -> None:
        pass


DEFAULT_METRICS_PORT = 9321
# A local run whose default port is taken (another run, another tool) tries this many more.
_LOCAL_PORT_TRIES = 50


def metrics_address(settings: DictConfig, ctx: DistContext) -> tuple[str, range]:
    """Where this rank listens: the host and the ports to try, first free one wins.

    A single local process listens on loopback and moves to the next free port when the default
    one is taken, so a laptop run never clashes with another; a distributed run (torchrun, srun,
    a Kubernetes pod) keeps the fixed port ``metrics.port + local rank`` that Prometheus scrapes.
    """
    alone = not ctx.distributed and "LOCAL_RANK" not in os.environ
    host = settings.host if settings.host != "auto" else ("127.0.0.1" if alone else "0.0.0.0")
    base = DEFAULT_METRICS_PORT if settings.port is None else settings.port
    first = base + ctx.local_rank
    tries = _LOCAL_PORT_TRIES if alone and settings.port is None else 1
    return host, range(first, first + tries)


def start_metrics(
    cfg: DictConfig, ctx: DistContext, preset: str, cost: StepCost
) -> TrainingMetrics | DisabledMetrics:
    """Serve this rank's metrics as ``cfg.metrics`` says; rank 0 logs where they are served.

    ``cost`` is the step's work as the model reports it (:func:`estimate_step_cost`).
    """
    if not cfg.metrics.enabled:
        return DisabledMetrics()
    metrics = TrainingMetrics(cfg.metrics, ctx, cost, preset)
    if ctx.is_main:
        log.info("metrics served at %s (rank %d)", metrics.url, ctx.rank)
    return metrics
