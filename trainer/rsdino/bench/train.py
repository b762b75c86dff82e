"""``rsdino bench train``: step time, images/s and MFU of a config's training steps on one rank.

Options and modes are described in ``rsdino.bench.arguments``; the report's fields in
``rsdino.bench.report``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from omegaconf import DictConfig

from rsdino.bench.clock import time_steps
from rsdino.bench.report import Measurement, build_report, device_name
from rsdino.bench.shards import pack_synthetic
from rsdino.bench.steps import (
    LoaderSteps,
    ModelSteps,
    PrefetchedSteps,
    Steps,
    prefetch_batches,
)
from rsdino.config.loader import ConfigError, load_config
from rsdino.train.loop import Trainer, total_steps
from rsdino.train.metrics import estimate_step_cost

# The benchmark measures training steps alone: no checkpoints, exporter, evaluation or downloads.
FORCED_OVERRIDES = (
    "train.dataset.source=synthetic",
    "checkpoint.every_steps=1000000000",
    "metrics.enabled=false",
    "evaluation.eval_period_iterations=0",
)
# e2e mode's loader workers at most, whatever train.num_workers says: its figures are quoted
# for at most 4 workers per GPU (issue 11), whatever the host has.
MAX_LOADER_WORKERS = 4
# e2e mode packs this many batches of tiles and the stream goes round them epoch after epoch:
# the shards sit in the page cache either way, so a second read costs what a first one does,
# and generating synthetic tiles (~0.1 s per 256 px tile on 2 cores) stays a few seconds.
PACKED_BATCHES = 4


def bench_config(preset: str | None, overrides: list[str], *extra: str) -> DictConfig:
    """The run config as ``rsdino train`` loads it, with the benchmark's settings on top."""
    return load_config(preset, [*overrides, *FORCED_OVERRIDES, *extra])


def e2e_config(preset: str | None, overrides: list[str], root: Path) -> DictConfig:
    """The config reading shards packed under ``root`` from the config's synthetic tiles."""
    cfg = bench_config(preset, overrides)
    samples = min(cfg.train.synthetic.num_samples, PACKED_BATCHES * cfg.train.batch_size_per_gpu)
    sized = (f"train.synthetic.num_samples={samples}",)
    pack_synthetic(bench_config(preset, overrides, *sized), root)
    return bench_config(
        preset,
        overrides,
        *sized,
        "train.dataset.source=shards",
        f"train.dataset.uri={root}",
        f"train.num_workers={min(cfg.train.num_workers, MAX_LOADER_WORKERS)}",
    )


def mode_steps(mode: str, trainer: Trainer, count: int) -> Steps:
    """The mode's step, with its inputs for ``count`` steps prepared (model, step) or opened."""
    if mode == "e2e":
        return LoaderSteps(trainer)
    batches = prefetch_batches(trainer.cfg, trainer, count)
    return ModelSteps(trainer, batches) if mode == "model" else PrefetchedSteps(trainer, batches)


def measure(
    preset: str | None, overrides: list[str], mode: str, warmup: int, steps: int
) -> tuple[DictConfig, Measurement]:
    """Build the trainer and the mode's inputs, run ``warmup`` steps, then time ``steps`` steps."""
    cfg = bench_config(preset, overrides)
    if warmup + steps > total_steps(cfg):
        raise ConfigError(
            f"the config schedules only {total_steps(cfg)} steps but the benchmark needs "
            f"{warmup + steps}; raise train.OFFICIAL_EPOCH_LENGTH or optim.epochs"
        )
    with TemporaryDirectory() as scratch:
        if mode == "e2e":
            cfg = e2e_config(preset, overrides, Path(scratch) / "shards")
        trainer = Trainer(cfg, Path(scratch) / "run", resume=False)
        if trainer.ctx.world_size > 1:
            raise ConfigError("rsdino bench train measures one rank; run it without torchrun")
        device = trainer.device
        run = mode_steps(mode, trainer, warmup + steps)
        trainer.model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        time_steps(device, run, range(warmup))
        data_wait = workers = None
        if isinstance(run, LoaderSteps):
            run.waited_seconds = 0.0  # the warmup's waits (workers starting) are not counted
        timed = time_steps(device, run, range(warmup, warmup + steps))
        if isinstance(run, LoaderSteps):
            data_wait, workers = run.waited_seconds / timed.wall_seconds, cfg.train.num_workers
            run.close()
        student = trainer.model.student
        measurement = Measurement(
            mode=mode,
            device=device,
            device_name=device_name(device),
            warmup_steps=warmup,
            step_seconds=timed.seconds,
            peak_memory_bytes=(
                torch.cuda.max_memory_allocated(device) - run.held_bytes
                if device.type == "cuda"
                else None
            ),
            nominal_flops=estimate_step_cost(cfg, student).flops,
            executed_flops=estimate_step_cost(cfg, student, executed=True).flops,
            data_wait_fraction=data_wait,
            loader_workers=workers,
        )
    return cfg, measurement


def run_bench_train(args: argparse.Namespace) -> int:
    cfg, measurement = measure(args.config, args.overrides, args.mode, args.warmup, args.steps)
    preset = args.config or "default"
    report = build_report(cfg, preset, args.overrides, measurement, args.peak_tflops)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0
