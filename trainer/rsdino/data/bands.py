"""The torch normaliser of Sentinel bands; the band tables it uses live in ``band_tables``."""

from __future__ import annotations

import torch
from torch import nn

from rsdino.data.band_tables import (
    S1_BANDS,
    S2_BANDS_SATLAS,
    S2_BANDS_SEN12MS,
    S2_LAYOUTS,
    band_names,
    band_stats,
)

# Old import paths: code and tests written before the tables moved import them from here.
__all__ = [
    "S1_BANDS",
    "S2_BANDS_SATLAS",
    "S2_BANDS_SEN12MS",
    "S2_LAYOUTS",
    "BandNormalizer",
    "band_names",
    "band_stats",
]


class BandNormalizer(nn.Module):
    """Per-band standardisation that accepts raw sensor dtypes (uint16 included).

    Normalising inside the model step lets the loader ship compact raw integers to the device.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} bands but std has {len(std)}")
        if any(value <= 0 for value in std):
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_bands(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_bands:
            raise ValueError(f"expected {self.num_bands} bands, got {x.shape[1]}")
        # The statistics follow the input, so the normaliser works before or after `.to(device)`.
        mean = self.mean.to(x.device)
        std = self.std.to(x.device)
        return (x.to(torch.float32) - mean) / std
