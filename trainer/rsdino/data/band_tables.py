"""Sentinel band layouts and default per-band statistics: plain facts, importable without torch.

The config checks and the CLI read these tables, so they live apart from the torch normaliser in
``rsdino.data.bands`` (which re-exports them under their old names).
"""

from __future__ import annotations

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

# The image modalities, in the order every reader, batch and encoder dict keeps them.
MODALITIES: tuple[str, ...] = ("s1", "s2")


def modalities_of(with_s1: bool) -> tuple[str, ...]:
    """The modalities a run or dataset holds: Sentinel-1 and -2, or Sentinel-2 alone."""
    return MODALITIES if with_s1 else ("s2",)


S2_LAYOUTS: dict[str, tuple[str, ...]] = {"sen12ms": S2_BANDS_SEN12MS, "satlas": S2_BANDS_SATLAS}


# Band orders of the evaluation datasets' files, written against the Sen12MS (ESA) order.
# EuroSAT-MS GeoTIFFs store the 13 bands with B8A last, not after B8.
EUROSAT_BANDS: tuple[str, ...] = (
    *(band for band in S2_BANDS_SEN12MS if band != "B8A"),
    "B8A",
)
# BigEarthNet-S2 is Level-2A: it has no B10 (cirrus), so that band is filled for 13-band models.
BIGEARTHNET_S2_BANDS: tuple[str, ...] = tuple(band for band in S2_BANDS_SEN12MS if band != "B10")

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
