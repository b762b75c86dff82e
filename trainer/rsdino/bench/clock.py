"""Step times on the device's own timeline: CUDA events on a GPU, the host clock elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch


@dataclass(frozen=True)
class StepTimes:
    """Seconds of each step, and the host's wall time from the first step's start to the end."""

    seconds: list[float]
    wall_seconds: float


def time_steps(device: torch.device, run: Callable[[int], object], steps: range) -> StepTimes:
    """Run ``run(step)`` for each step back to back, as the training loop does (no sync between).

    On CUDA the host runs ahead of the device, so a host clock would time kernel launches; an
    event recorded after each step marks when the device finished it instead, and any time the
    device idles waiting for the host (a slow batch) falls into the next step.
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    if cuda:
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(steps) + 1)]
        marks[0].record()
        for mark, step in zip(marks[1:], steps, strict=True):
            run(step)
            mark.record()
        torch.cuda.synchronize(device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in pairwise(marks)]
        return StepTimes(seconds, time.perf_counter() - started)
    times = [started]
    for step in steps:
        run(step)
        times.append(time.perf_counter())
    return StepTimes([end - start for start, end in pairwise(times)], times[-1] - started)
