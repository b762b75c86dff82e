"""Any folder of GeoTIFFs, one sample per file: for data that follows no dataset layout."""

from __future__ import annotations

import posixpath

import numpy as np
from torch.utils.data import Dataset

from rsdino.data.band_tables import MODALITIES
from rsdino.data.sources.decode import (
    BadDataPolicy,
    BandCountError,
    DataError,
    ListKeys,
    ReadBytes,
    day_of_year_in_name,
    decode_geotiff,
    prepare_sar,
    to_reflectance_uint16,
)

_TIFF_SUFFIXES = (".tif", ".tiff")


class GeoTiffFolderSource(Dataset):
    """Every .tif/.tiff under the root as {modality: [C, H, W], "doy", "key", "label": -1}.

    `bands` picks 1-based band indices (GDAL's numbering) in the order given; None keeps all.
    `band_count` is how many bands every file must have when `bands` is None: a batch stacks
    equal shapes only, so a file with another count is bad data (named, then skipped or fatal
    per `on_error`) instead of a collate error that names no file. None accepts any count.
    "s2" becomes uint16 reflectance x10000; "s1" must end up with 2 bands (VV, VH in dB) and gets
    the same NaN handling as Sen12MS. The day of year comes from the first date in the file name
    (0 when there is none). Bad files follow `on_error` as in the other sources.
    """

    def __init__(
        self,
        list_keys: ListKeys,
        read_bytes: ReadBytes,
        bands: list[int] | None = None,
        modality: str = "s2",
        on_error: str = "skip",
        band_count: int | None = None,
    ) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if bands is not None and (not bands or any(band < 1 for band in bands)):
            raise ValueError(f"bands must be a non-empty list of 1-based indices, got {bands}")
        if band_count is not None and band_count < 1:
            raise ValueError(f"band_count must be >= 1, got {band_count}")
        self.bands = None if bands is None else list(bands)
        self.band_count = band_count
        self.modality = modality
        self._read_bytes = read_bytes
        self.bad_data = BadDataPolicy(on_error)
        self._keys = [key for key in list_keys("") if key.lower().endswith(_TIFF_SUFFIXES)]

    @property
    def error_counts(self) -> dict[str, int]:
        return self.bad_data.error_counts

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> dict:
        key = self._keys[index]
        try:
            return self._read(key)
        except DataError as error:
            self.bad_data.at_read(error)

    def _read(self, key: str) -> dict:
        raster = self._select_bands(decode_geotiff(self._read_bytes(key), key), key)
        if self.modality == "s2":
            pixels = to_reflectance_uint16(raster)
        else:
            pixels = prepare_sar(raster, key, self.bad_data)
        return {
            self.modality: pixels,
            "doy": day_of_year_in_name(posixpath.basename(key)),
            "key": key,
            "label": -1,
        }

    def _select_bands(self, raster: np.ndarray, key: str) -> np.ndarray:
        if self.bands is None:
            if self.band_count is not None and raster.shape[0] != self.band_count:
                raise BandCountError(
                    key,
                    f"has {raster.shape[0]} bands, expected {self.band_count} like every file "
                    "of the dataset",
                    "remove or convert the file, or pick bands with train.dataset.bands",
                )
            return raster
        if max(self.bands) > raster.shape[0]:
            raise BandCountError(
                key,
                f"has {raster.shape[0]} bands, cannot select bands {self.bands}",
                "choose band indices within the file's band count",
            )
        return raster[[band - 1 for band in self.bands]]
