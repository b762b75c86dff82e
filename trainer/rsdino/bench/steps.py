"""What each ``rsdino bench train`` mode runs as one step, with its inputs prepared up front."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from omegaconf import DictConfig

from rsdino.data.worker_stats import WORKER_STATS_KEY, raise_worker_error
from rsdino.train.loop import Trainer, make_loader


def prefetch_batches(cfg: DictConfig, trainer: Trainer, count: int) -> list[dict]:
    """``count`` batches from the run's own loader, held in (pinned) host memory.

    The loader and its workers are gone when this returns, so they take no CPU from the steps.
    """
    batches = iter(make_loader(cfg, 0, trainer.ctx))
    fetched = [next(batches) for _ in range(count)]
    for batch in fetched:
        batch.pop(WORKER_STATS_KEY, None)  # loader bookkeeping, not model input
    return fetched


class ModelSteps:
    """model mode: every step's views built on the device first; a step is ``Trainer.optimise``,
    the part of ``train_step`` after ``make_views`` (tests/test_bench_train.py checks that
    building them all ahead changes nothing)."""

    def __init__(self, trainer: Trainer, batches: list[dict]) -> None:
        self.trainer = trainer
        before = _allocated(trainer.device)
        self.views = [trainer.make_views(batch, step) for step, batch in enumerate(batches)]
        # Device memory the prebuilt views hold through the run, left out of the step's peak.
        self.held_bytes = _allocated(trainer.device) - before

    def __call__(self, step: int) -> None:
        self.trainer.optimise(self.views[step], step)


class PrefetchedSteps:
    """step mode: ``Trainer.train_step`` (views and optimisation) on batches fetched before."""

    held_bytes = 0

    def __init__(self, trainer: Trainer, batches: list[dict]) -> None:
        self.trainer = trainer
        self.batches = batches

    def __call__(self, step: int) -> None:
        self.trainer.train_step(self.batches[step], step)


class LoaderSteps:
    """e2e mode: each step waits for its batch from the live loader, as ``Trainer.run`` does."""

    held_bytes = 0

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.batches: Iterator[dict] | None = iter(make_loader(trainer.cfg, 0, trainer.ctx))
        self.waited_seconds = 0.0  # host time blocked on the loader, since the last reset

    def __call__(self, step: int) -> None:
        assert self.batches is not None, "the loader was closed"
        started = time.perf_counter()
        batch = next(self.batches)
        raise_worker_error(batch)
        self.waited_seconds += time.perf_counter() - started
        batch.pop(WORKER_STATS_KEY, None)
        self.trainer.train_step(batch, step)

    def close(self) -> None:
        """Drop the iterator, which stops the loader's worker processes."""
        self.batches = None


Steps = ModelSteps | PrefetchedSteps | LoaderSteps


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
