"""Where and how a run executes: device, autocast precision, per-step random streams."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from rsdino.errors import RsdinoError


def resolve_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RsdinoError(
                "train.device=cuda but no CUDA device is visible; use train.device=auto or cpu"
            )
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32.

    ``auto`` picks bf16 only on GPUs with native bf16 support; on CPU it stays fp32 because CPU
    bf16 autocast is slower than fp32 on most hosts and changes results for no gain.
    """
    if requested == "fp32":
        return None
    if requested == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RsdinoError("train.precision=bf16 but this GPU has no bf16 support; use fp32")
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def resolve_compile(requested: str, device: torch.device) -> bool:
    """Whether to torch.compile the transformer blocks: ``auto`` does on CUDA only, where fused
    kernels pay for the compile time; on a CPU the compile takes longer than a short run."""
    mode = str(requested).lower()
    return device.type == "cuda" if mode == "auto" else mode == "true"


def resolve_reduce_precision(requested: str) -> torch.dtype:
    """The dtype FSDP2 reduce-scatters gradients in.

    fp32 sums the ranks' gradients at full precision; bf16 halves the gradient traffic at the
    cost of rounding each rank's contribution before the sum.
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if requested not in dtypes:
        raise RsdinoError(f"train.reduce_precision={requested!r} is not one of {', '.join(dtypes)}")
    return dtypes[requested]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def step_seed(seed: int, step: int) -> int:
    """A seed derived from (run seed, step) alone.

    Every random choice of a step (crops, masks, stochastic depth) comes from this seed, so a run
    resumed at step K draws exactly what an uninterrupted run draws at step K without saving
    generator states.
    """
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the step's augmentation and masking (small draws, moved to the device)."""
    return torch.Generator().manual_seed(step_seed(seed, step))
