"""Modality dropout: some student views see only one of the co-registered modalities.

Training on views with a missing modality makes a fused model usable when, at inference, a
Sentinel-1 or Sentinel-2 acquisition is missing (clouds, gaps in the archive). The teacher keeps
seeing every modality, so the student learns to infer the fused target from one sensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_modality_presence(
    n_rows: int, modalities: tuple[str, ...], probability: float, generator: torch.Generator
) -> dict[str, Tensor] | None:
    """Per row, with ``probability``, keep one modality chosen uniformly; else keep them all.

    Returns modality -> bool [n_rows] on the CPU, or None when nothing can be dropped (one
    modality, or probability 0), so callers skip the masking work entirely.
    """
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"modality dropout probability must be in [0, 1), got {probability}")
    if len(modalities) < 2 or probability == 0.0:
        return None
    single = torch.rand(n_rows, generator=generator) < probability
    kept = torch.randint(len(modalities), (n_rows,), generator=generator)
    return {name: ~single | (kept == index) for index, name in enumerate(modalities)}
