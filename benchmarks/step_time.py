"""Step time and MFU of one training rank, data loading excluded: only ``train_step`` is timed.

Batches are fetched from the real loader before the clock starts, so the figures are what the
device sustains when the input pipeline keeps up. On CUDA every step is timed with CUDA events on
the device's own timeline; on CPU with the host clock. FLOPs are model FLOPs
(``estimate_step_cost``): the recomputation of activation checkpointing is not counted, so it
shows as lower MFU.

    python benchmarks/step_time.py --config quickstart
    python benchmarks/step_time.py --config vitl16_short --warmup 3 --steps 10 \\
        --out vitl16.json train.device=cuda train.activation_checkpointing=true
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rsdino.config.loader import load_config
from rsdino.data.worker_stats import WORKER_STATS_KEY
from rsdino.models.vit import ARCH_SPECS
from rsdino.train.loop import Trainer, make_loader, total_steps
from rsdino.train.metrics import estimate_step_cost
from rsdino.train.runtime import resolve_precision

# Dense bf16 peak of the GPUs we benchmark on (NVIDIA datasheets, SXM parts, no sparsity).
PEAK_TFLOPS_BY_DEVICE = {"H100": 989.0, "H200": 989.0}
# The benchmark measures the step alone: no checkpoints, no exporter, no dataset downloads.
FORCED_OVERRIDES = (
    "train.dataset.source=synthetic",
    "checkpoint.every_steps=1000000000",
    "metrics.enabled=false",
)


def benchmark_config(preset: str, overrides: list[str]) -> DictConfig:
    """The run config as ``rsdino train`` loads it, with the benchmark's settings on top."""
    return load_config(preset, [*overrides, *FORCED_OVERRIDES])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def default_peak_tflops(name: str) -> float | None:
    """The datasheet peak for a known GPU; None (no MFU) for anything else, CPUs included."""
    for model, peak in PEAK_TFLOPS_BY_DEVICE.items():
        if model in name:
            return peak
    return None


def encoder_shape(cfg: DictConfig) -> dict[str, Any]:
    """Arch, patch, width and depth of the (Sentinel-2) ViT the run trains."""
    student = cfg.student
    arch = student.arch_s2 if cfg.train.multimodal else student.arch
    spec_dim, spec_depth, _ = ARCH_SPECS[arch]
    return {
        "arch": arch,
        "patch_size": student.patch_size,
        "embed_dim": spec_dim if student.embed_dim is None else student.embed_dim,
        "depth": spec_depth if student.depth is None else student.depth,
        "multimodal": cfg.train.multimodal,
    }


def prefetch_batches(cfg: DictConfig, trainer: Trainer, count: int) -> list[dict]:
    """``count`` batches from the run's own loader, held in (pinned) host memory.

    The loader and its workers are gone when this returns, so they take no CPU from the steps.
    """
    batches = iter(make_loader(cfg, 0, trainer.ctx))
    fetched = [next(batches) for _ in range(count)]
    for batch in fetched:
        batch.pop(WORKER_STATS_KEY, None)  # loader bookkeeping, not model input
    return fetched


def step_seconds(trainer: Trainer, batches: list[dict], first_step: int) -> list[float]:
    """Seconds of each step, back to back, as the training loop runs them (no sync between)."""
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(batches) + 1)]
        marks[0].record()
        for offset, batch in enumerate(batches):
            trainer.train_step(batch, first_step + offset)
            marks[offset + 1].record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in pairwise(marks)]
    times = [time.perf_counter()]
    for offset, batch in enumerate(batches):
        trainer.train_step(batch, first_step + offset)
        times.append(time.perf_counter())
    return [end - start for start, end in pairwise(times)]


@dataclass(frozen=True)
class Measurement:
    """What one benchmark run observed; everything else in the report follows from the config."""

    device: torch.device
    device_name: str
    warmup_steps: int
    step_seconds: list[float]
    peak_memory_bytes: int | None  # CUDA only
    flops_per_step: float  # as the trained model reports it (estimate_step_cost)


def measure(cfg: DictConfig, warmup: int, steps: int) -> Measurement:
    """Build the trainer, fetch the batches, run ``warmup`` steps, then time ``steps`` steps."""
    if warmup + steps > total_steps(cfg):
        raise SystemExit(
            f"the config schedules only {total_steps(cfg)} steps but the benchmark needs "
            f"{warmup + steps}; raise train.OFFICIAL_EPOCH_LENGTH or optim.epochs"
        )
    with TemporaryDirectory() as out:
        trainer = Trainer(cfg, Path(out) / "run", resume=False)
        device = trainer.device
        batches = prefetch_batches(cfg, trainer, warmup + steps)
        trainer.model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_seconds(trainer, batches[:warmup], 0)
        durations = step_seconds(trainer, batches[warmup:], warmup)
        peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        flops = estimate_step_cost(cfg, trainer.model.student).flops
    return Measurement(device, device_name(device), warmup, durations, peak_memory, flops)


def build_report(
    cfg: DictConfig,
    preset: str,
    overrides: list[str],
    measurement: Measurement,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """The JSON report: throughput, FLOP rate and MFU of the measured steps."""
    durations = measurement.step_seconds
    peak = default_peak_tflops(measurement.device_name) if peak_tflops is None else peak_tflops
    precision = resolve_precision(cfg.train.precision, measurement.device)
    batch_size = cfg.train.batch_size_per_gpu
    mean_step = statistics.fmean(durations)
    flops = measurement.flops_per_step
    achieved_tflops = flops / mean_step / 1e12
    peak_memory = measurement.peak_memory_bytes
    return {
        "device": measurement.device_name,
        "torch": torch.__version__,
        "config": preset,
        "overrides": overrides,
        **encoder_shape(cfg),
        "precision": "fp32" if precision is None else str(precision).removeprefix("torch."),
        "activation_checkpointing": OmegaConf.select(
            cfg, "train.activation_checkpointing", default=False
        ),
        "batch_per_gpu": batch_size,
        "global_crops_size": cfg.crops.global_crops_size,
        "local_crops_size": cfg.crops.local_crops_size,
        "local_crops_number": cfg.crops.local_crops_number,
        "warmup_steps": measurement.warmup_steps,
        "timed_steps": len(durations),
        "mean_step_s": mean_step,
        "median_step_s": statistics.median(durations),
        "samples_per_s": batch_size / mean_step,
        "flops_per_step": flops,
        "achieved_tflops": achieved_tflops,
        "peak_tflops": peak,
        "mfu": None if peak is None else achieved_tflops / peak,
        "peak_memory_gib": None if peak_memory is None else peak_memory / 2**30,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="quickstart", help="preset name or YAML file")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (>= 1)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: 989 on H100/H200, dense bf16; else no MFU)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")

    cfg = benchmark_config(args.config, args.overrides)
    measurement = measure(cfg, args.warmup, args.steps)
    report = build_report(cfg, args.config, args.overrides, measurement, args.peak_tflops)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
