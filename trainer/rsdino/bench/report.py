"""The JSON report of ``rsdino bench train``: what was measured, and the rates that follow.

Images are source images, one per sample of the batch however many crops it is cut into, on
the one rank the benchmark runs: batch 64 at 0.5 s per step is 128 images/s. Rates use the
median step, robust to the odd slow step on a shared machine. MFU is given twice: by the
nominal FLOPs of the step (``estimate_step_cost``: every residual branch on every crop) and by
the FLOPs it actually runs (``executed=True``: rows that subset stochastic depth skips are not
counted). Neither counts the recomputation of activation checkpointing, which therefore shows as
lower MFU."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from rsdino.models.vit import ARCH_SPECS
from rsdino.train.runtime import resolve_compile, resolve_precision

# Dense bf16 peak of the GPUs we benchmark on (NVIDIA datasheets, SXM parts, no sparsity).
PEAK_TFLOPS_BY_DEVICE = {"H100": 989.0, "H200": 989.0}


@dataclass(frozen=True)
class Measurement:
    """What one benchmark run observed; everything else in the report follows from the config."""

    mode: str
    device: torch.device
    device_name: str
    warmup_steps: int
    step_seconds: list[float]
    peak_memory_bytes: int | None  # CUDA only
    nominal_flops: float  # per step, estimate_step_cost(executed=False)
    executed_flops: float  # per step, estimate_step_cost(executed=True)
    data_wait_fraction: float | None  # e2e only: host time blocked on the loader / wall time
    loader_workers: int | None  # e2e only


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


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with ``fraction`` of the values at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


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


def build_report(
    cfg: DictConfig,
    preset: str,
    overrides: list[str],
    measurement: Measurement,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """The JSON report: step time, images/s, FLOP rates and MFU of the timed steps."""
    peak = default_peak_tflops(measurement.device_name) if peak_tflops is None else peak_tflops
    precision = resolve_precision(cfg.train.precision, measurement.device)
    batch_size = cfg.train.batch_size_per_gpu
    median_step = percentile(measurement.step_seconds, 0.5)
    nominal_tflops = measurement.nominal_flops / median_step / 1e12
    executed_tflops = measurement.executed_flops / median_step / 1e12
    peak_memory = measurement.peak_memory_bytes
    return {
        "mode": measurement.mode,
        "device": measurement.device_name,
        "torch": torch.__version__,
        "config": preset,
        "overrides": overrides,
        **encoder_shape(cfg),
        "precision": "fp32" if precision is None else str(precision).removeprefix("torch."),
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "compiled_blocks": resolve_compile(cfg.train.compile, measurement.device),
        "batch_per_gpu": batch_size,
        "global_crops_size": cfg.crops.global_crops_size,
        "local_crops_size": cfg.crops.local_crops_size,
        "local_crops_number": cfg.crops.local_crops_number,
        "warmup_steps": measurement.warmup_steps,
        "timed_steps": len(measurement.step_seconds),
        "step_ms_median": median_step * 1e3,
        "step_ms_p90": percentile(measurement.step_seconds, 0.9) * 1e3,
        "images_per_s": batch_size / median_step,
        "flops_per_step_nominal": measurement.nominal_flops,
        "flops_per_step_executed": measurement.executed_flops,
        "tflops_nominal": nominal_tflops,
        "tflops_executed": executed_tflops,
        "peak_tflops": peak,
        "mfu_nominal": None if peak is None else nominal_tflops / peak,
        "mfu_executed": None if peak is None else executed_tflops / peak,
        "peak_memory_gib": None if peak_memory is None else peak_memory / 2**30,
        "data_wait_fraction": measurement.data_wait_fraction,
        "loader_workers": measurement.loader_workers,
    }
