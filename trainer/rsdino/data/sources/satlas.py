"""SatlasPretrain Sentinel-2 tiles: one PNG per band group, 9 channels in S2_BANDS_SATLAS order.

Layout, one folder per split at the dataset root::

    <split>/<image_dir>/tci/<col>_<row>.png   RGB = B4, B3, B2
    <split>/<image_dir>/b05/<col>_<row>.png   one band each: b05, b06, b07, b08, b11, b12

`<image_dir>` names one Sentinel-2 image; its acquisition date is the first YYYY-MM-DD or
YYYYMMDD in that name (e.g. the product ID `S2A_MSIL1C_20220614T102041_...`), day of year 0 when
there is none.

Satlas stores 8-bit PNGs. They are mapped back to approximate L1C reflectance x10000, so they
share the scale (and normalisation statistics) of the 13-band GeoTIFF sources:
- TCI is ESA's true-colour image, whose 255 saturates at an L1C value of 3558: v * 3558 / 255.
- The other bands were written by Satlas as value // 32 clipped to 255 (1 = 8160 / 255 per
  step): v * 32, the lower edge of each step; values beyond 8160 stay saturated.
16-bit PNGs are taken as reflectance x10000 unchanged.
"""

from __future__ import annotations

import re

import numpy as np
from torch.utils.data import Dataset

from rsdino.data.sources.decode import (
    BadDataPolicy,
    DataError,
    ListKeys,
    MissingPartnerError,
    ReadBytes,
    check_band_count,
    check_same_size,
    day_of_year_in_name,
    decode_png,
)

# (folder, Sentinel-2 bands it holds), in the channel order of S2_BANDS_SATLAS.
BAND_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tci", ("B4", "B3", "B2")),
    ("b05", ("B5",)),
    ("b06", ("B6",)),
    ("b07", ("B7",)),
    ("b08", ("B8",)),
    ("b11", ("B11",)),
    ("b12", ("B12",)),
)
TCI_L1C_SATURATION = 3558.0
BAND_8BIT_STEP = 32.0
_UINT16_MAX = np.iinfo(np.uint16).max
_TILE_FILE = re.compile(r"^(?P<image>[^/]+)/(?P<group>[^/]+)/(?P<tile>-?\d+_-?\d+)\.png$")


def to_reflectance(pixels: np.ndarray, bits: int, group: str) -> np.ndarray:
    """A band group's PNG values as uint16 L1C reflectance x10000 (see the module docstring)."""
    if bits == 16:
        return pixels.astype(np.uint16)
    scale = TCI_L1C_SATURATION / 255.0 if group == "tci" else BAND_8BIT_STEP
    reflectance = np.rint(pixels.astype(np.float32) * scale)
    return np.clip(reflectance, 0, _UINT16_MAX).astype(np.uint16)


class SatlasSource(Dataset):
    """Satlas tiles as samples {"s2": uint16 [9, H, W], "doy", "key", "label": -1}.

    The key of a tile is `<split>/<image_dir>/<col>_<row>`. A tile missing band groups is dropped
    while indexing (counted as "missing_partner") under `on_error="skip"`; files that turn out bad
    when read raise `SkipSample` (wrap the source in `SkipBadSamples`). `"fail"` raises instead.
    """

    def __init__(
        self,
        list_keys: ListKeys,
        read_bytes: ReadBytes,
        split: str = "train",
        on_error: str = "skip",
    ) -> None:
        if not split or "/" in split:
            raise ValueError(f"split must name one folder at the dataset root, got {split!r}")
        self.split = split
        self._read_bytes = read_bytes
        self.bad_data = BadDataPolicy(on_error)
        self._tiles = self._index(list_keys(f"{split}/"))

    @property
    def error_counts(self) -> dict[str, int]:
        return self.bad_data.error_counts

    @property
    def keys(self) -> list[str]:
        return [f"{self.split}/{image}/{tile}" for image, tile in self._tiles]

    def __len__(self) -> int:
        return len(self._tiles)

    def __getitem__(self, index: int) -> dict:
        image, tile = self._tiles[index]
        try:
            return self._read(image, tile)
        except DataError as error:
            self.bad_data.at_read(error)

    def _index(self, keys: list[str]) -> list[tuple[str, str]]:
        """(image_dir, tile) of every tile that has all band groups."""
        groups_of_tile: dict[tuple[str, str], set[str]] = {}
        for key in keys:
            match = _TILE_FILE.match(key[len(self.split) + 1 :])
            if match is not None:
                tile_id = (match["image"], match["tile"])
                groups_of_tile.setdefault(tile_id, set()).add(match["group"])
        wanted = [group for group, _ in BAND_GROUPS]
        tiles = []
        for image, tile in sorted(groups_of_tile):
            missing = [group for group in wanted if group not in groups_of_tile[image, tile]]
            if missing:
                self.bad_data.at_index(
                    MissingPartnerError(
                        f"{self.split}/{image}/{tile}",
                        f"tile lacks band groups {', '.join(missing)}",
                        "add the missing PNGs or remove the tile",
                    )
                )
                continue
            tiles.append((image, tile))
        return tiles

    def _read(self, image: str, tile: str) -> dict:
        channels = []
        for group, bands in BAND_GROUPS:
            key = f"{self.split}/{image}/{group}/{tile}.png"
            pixels, bits = decode_png(self._read_bytes(key), key)
            check_band_count(pixels, len(bands), key, f"band group {group}")
            if channels:
                check_same_size(pixels, channels[0], key, f"{group} and tci sizes differ")
            channels.append(to_reflectance(pixels, bits, group))
        return {
            "s2": np.concatenate(channels),
            "doy": day_of_year_in_name(image),
            "key": f"{self.split}/{image}/{tile}",
            "label": -1,
        }
