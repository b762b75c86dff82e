"""Sentinel band layouts, default per-band statistics and the normaliser that uses them."""

from __future__ import annotations

import torch
from torch import nn

S2_BANDS_SEN12MS: tuple[str, ...] = (
    "B1",
    "B2",
    "B3",
    "B4",
    "B5",
    "B6",
    "B7",
    "B8",
    "B8A",
    "B9",
    "B10",
    "B11",
    "B12",
)
# Satlas stores the true-colour triplet first (B4, B3, B2 = TCI), then the 20 m bands it keeps.
S2_BANDS_SATLAS: tuple[str, ...] = ("B4", "B3", "B2", "B5", "B6", "B7", "B8", "B11", "B12")
S1_BANDS: tuple[str, ...] = ("VV", "VH")

S2_LAYOUTS: dict[str, tuple[str, ...]] = {"sen12ms": S2_BANDS_SEN12MS, "satlas": S2_BANDS_SATLAS}

# Default statistics: typical published values for Sentinel-2 L1C top-of-atmosphere reflectance
# scaled by 10000 (as stored in Sen12MS GeoTIFFs) and for Sentinel-1 GRD backscatter in dB, of the
# order reported for large global Sentinel collections (e.g. SSL4EO-S12). They are approximate
# placeholders until statistics are measured on the actual training data.
_S2_L1C_MEAN: dict[str, float] = {
    "B1": 1610.0,
    "B2": 1400.0,
    "B3": 1320.0,
    "B4": 1370.0,
    "B5": 1560.0,
    "B6": 2110.0,
    "B7": 2390.0,
    "B8": 2320.0,
    "B8A": 2580.0,
    "B9": 840.0,
    "B10": 22.0,
    "B11": 2200.0,
    "B12": 1540.0,
}
_S2_L1C_STD: dict[str, float] = {
    "B1": 790.0,
    "B2": 850.0,
    "B3": 880.0,
    "B4": 1140.0,
    "B5": 1130.0,
    "B6": 1160.0,
    "B7": 1280.0,
    "B8": 1250.0,
    "B8A": 1350.0,
    "B9": 580.0,
    "B10": 50.0,
    "B11": 1340.0,
    "B12": 1140.0,
}
_S1_DB_MEAN: dict[str, float] = {"VV": -12.5, "VH": -20.2}
_S1_DB_STD: dict[str, float] = {"VV": 5.3, "VH": 5.9}


def band_names(modality: str, layout: str) -> tuple[str, ...]:
    """Band names of a modality ("s1" or "s2") in a layout ("sen12ms" or "satlas").

    Sentinel-1 has the same two bands in every layout; the layout is still checked so that a typo
    in a config fails loudly whatever the modality.
    """
    if layout not in S2_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(S2_LAYOUTS)}")
    if modality == "s2":
        return S2_LAYOUTS[layout]
    if modality == "s1":
        return S1_BANDS
    raise ValueError(f"unknown modality {modality!r}; expected 's1' or 's2'")


def band_stats(modality: str, layout: str) -> tuple[list[float], list[float]]:
    """Default (mean, std) per band, in the band order of `layout`."""
    names = band_names(modality, layout)
    mean_table, std_table = (
        (_S2_L1C_MEAN, _S2_L1C_STD) if modality == "s2" else (_S1_DB_MEAN, _S1_DB_STD)
    )
    return [mean_table[name] for name in names], [std_table[name] for name in names]


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
