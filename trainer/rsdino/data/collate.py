"""Batching of sample dicts into tensors that keep the compact raw dtypes."""

from __future__ import annotations

import numbers

import numpy as np
import torch


def _stack_field(key: str, values: list) -> torch.Tensor | list[str]:
    """Stack one field: arrays keep their dtype (floats become float32), scalars become 1-D."""
    first = values[0]
    if isinstance(first, str):
        return list(values)
    if isinstance(first, (np.ndarray, torch.Tensor)):
        try:
            if isinstance(first, np.ndarray):
                # One copy into new, writable memory: inputs may be read-only shard views.
                stacked = torch.from_numpy(np.stack(values))
            else:
                stacked = torch.stack([torch.as_tensor(value) for value in values])
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(f"cannot stack field {key!r}: {error}") from error
        return stacked.float() if stacked.is_floating_point() else stacked
    if isinstance(first, numbers.Integral):
        return torch.tensor([int(value) for value in values], dtype=torch.int64)
    if isinstance(first, numbers.Real):
        return torch.tensor([float(value) for value in values], dtype=torch.float32)
    raise ValueError(f"field {key!r} has unsupported type {type(first).__name__}")


def collate_samples(samples: list[dict]) -> dict:
    """Turn a list of sample dicts into one batch dict.

    s2 stays uint16 (half the bytes of float32 on the way to the device; normalise there), s1 is
    float32 [B, 2, H, W], doy and label int64 [B], landcover uint8 [B, H, W], key a list of str.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    keys = set().union(*samples)
    for key in sorted(keys):
        missing = sum(key not in sample for sample in samples)
        if missing:
            raise ValueError(f"field {key!r} is missing from {missing} of {len(samples)} samples")
    return {key: _stack_field(key, [sample[key] for sample in samples]) for key in samples[0]}
