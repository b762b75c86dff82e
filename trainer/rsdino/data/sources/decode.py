"""Bytes to validated arrays, file names to dates, and the policy for data that is bad.

Sources read through `read_bytes`, so everything here works on bytes: GeoTIFFs through
`rasterio.io.MemoryFile`, PNGs through Pillow. Each kind of bad data has its own `DataError`
subclass with a `kind` string, which is also the key of the source's `error_counts`.
"""

from __future__ import annotations

import datetime
import io
import logging
import re
import warnings
from collections.abc import Callable
from typing import NoReturn

import numpy as np
import rasterio
import rasterio.errors
import rasterio.io
import rasterio.session
from PIL import Image
from torch.utils.data import get_worker_info

from rsdino.data.bands import S1_BANDS
from rsdino.data.choices import ON_ERROR
from rsdino.errors import ExitCode, RsdinoError

logger = logging.getLogger(__name__)

# The storage interface every source takes: sorted keys under a prefix, relative to the dataset
# root, and the bytes of one key. Local folders and object stores both fit it.
ListKeys = Callable[[str], list[str]]
ReadBytes = Callable[[str], bytes]

# A SAR band with more missing pixels than this is useless; fewer are filled (see fill_sar_gaps).
MAX_SAR_NAN_FRACTION = 0.5
SAR_BAND_COUNT = len(S1_BANDS)
_UINT16_MAX = np.iinfo(np.uint16).max
_PNG_8BIT_MODES = ("L", "RGB", "RGBA", "LA")
_PNG_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


class DataError(RsdinoError):
    """A sample whose files cannot be used; `kind` names what is wrong and `key` which file."""

    kind = "data"
    exit_code = ExitCode.DATA

    def __init__(self, key: str, problem: str, remedy: str) -> None:
        super().__init__(f"{key}: {problem}; {remedy}")
        self.key = key


class CorruptFileError(DataError):
    kind = "corrupt"


class BandCountError(DataError):
    kind = "band_count"


class NanTileError(DataError):
    kind = "nan"


class MissingPartnerError(DataError):
    kind = "missing_partner"


class ShapeMismatchError(DataError):
    kind = "shape"


class SkipSample(Exception):
    """Raised by a source under `on_error="skip"`: the sample is bad, `SkipBadSamples` moves on."""

    def __init__(self, kind: str, key: str) -> None:
        super().__init__(f"skipped {key} ({kind}); wrap the source in SkipBadSamples")
        self.kind = kind
        self.key = key


# One bad-data finding as it travels from a loader worker: (kind, key, message, log level).
Finding = tuple[str, str, str, int]


class BadDataPolicy:
    """Counts bad data per kind, logs each bad key once, and either skips or fails.

    Counts are of distinct keys, so reading a bad sample again in a later epoch does not inflate
    them. A DataLoader worker holds a copy of the source: there a new finding is only queued in
    ``unsent``; the worker ships it with its next batch and the training process :meth:`merge` s
    it into its own policy, which logs and counts it once for the whole run, whichever worker (or
    how many) met the key.
    """

    def __init__(self, on_error: str) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.error_counts: dict[str, int] = {}
        self.unsent: list[Finding] = []
        self._seen: set[tuple[str, str]] = set()

    def note(self, kind: str, key: str, message: str, level: int = logging.WARNING) -> None:
        """Count `key` under `kind` and log `message` the first time this pair is seen."""
        if (kind, key) in self._seen:
            return
        self._seen.add((kind, key))
        self.error_counts[kind] = self.error_counts.get(kind, 0) + 1
        if get_worker_info() is None:
            logger.log(level, "%s: %s", kind, message)
        else:
            self.unsent.append((kind, key, message, level))

    def merge(self, findings: list[Finding]) -> None:
        """Findings of a loader worker, counted and logged here unless already known."""
        for kind, key, message, level in findings:
            self.note(kind, key, message, level)

    def at_index(self, error: DataError) -> None:
        """A sample found bad while indexing: fail, or count it so the caller can drop it."""
        if self.on_error == "fail":
            raise error
        self.note(error.kind, error.key, str(error))

    def at_read(self, error: DataError) -> NoReturn:
        """A sample found bad while reading: fail, or count it and signal a skip."""
        if self.on_error == "fail":
            raise error
        self.note(error.kind, error.key, str(error))
        raise SkipSample(error.kind, error.key) from error


def decode_geotiff(data: bytes, key: str) -> np.ndarray:
    """All bands of a GeoTIFF as [C, H, W] in the file's dtype."""
    try:
        with warnings.catch_warnings():
            # Plain (not georeferenced) TIFFs are fine for training.
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            # A dummy session: the bytes are already in memory, and with AWS keys in the
            # environment rasterio would otherwise build a boto3 session per tile (about 9x
            # slower decoding, measured by benchmarks/data_throughput.py).
            with (
                rasterio.Env(session=rasterio.session.DummySession()),
                rasterio.io.MemoryFile(data) as memory_file,
                memory_file.open() as dataset,
            ):
                return dataset.read()
    except rasterio.errors.RasterioError as error:
        raise CorruptFileError(
            key, f"cannot decode GeoTIFF ({error})", "re-download or remove the file"
        ) from error


def decode_png(data: bytes, key: str) -> tuple[np.ndarray, int]:
    """A PNG as [C, H, W] (uint8 or uint16) and its bits per sample (8 or 16)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            pixels = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise CorruptFileError(
            key, f"cannot decode PNG ({error})", "re-download or remove the file"
        ) from error
    if mode in _PNG_8BIT_MODES:
        bits = 8
    elif mode in _PNG_16BIT_MODES:
        bits = 16
        pixels = np.clip(pixels, 0, _UINT16_MAX).astype(np.uint16)
    else:
        raise CorruptFileError(
            key, f"unsupported PNG mode {mode!r}", "store 8- or 16-bit grey or RGB PNGs"
        )
    channels_first = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    return np.ascontiguousarray(channels_first), bits


def check_band_count(array: np.ndarray, expected: int, key: str, what: str) -> None:
    if array.shape[0] != expected:
        raise BandCountError(
            key,
            f"{what} has {array.shape[0]} bands, expected {expected}",
            "check that the file belongs to this dataset layout",
        )


def check_same_size(first: np.ndarray, second: np.ndarray, key: str, what: str) -> None:
    """Co-registered rasters must cover the same pixels: [.., H, W] must agree."""
    if first.shape[-2:] != second.shape[-2:]:
        raise ShapeMismatchError(
            key,
            f"{what}: {tuple(first.shape[-2:])} vs {tuple(second.shape[-2:])} pixels",
            "the rasters of one sample must be co-registered; remove or re-export them",
        )


def to_reflectance_uint16(array: np.ndarray) -> np.ndarray:
    """Sentinel-2 digital numbers (reflectance x10000) as uint16.

    Integers are clipped to the uint16 range; floats are rounded first and non-finite values
    become 0, Sentinel-2's no-data value.
    """
    if array.dtype == np.uint16:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.rint(np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0))
    return np.clip(array, 0, _UINT16_MAX).astype(np.uint16)


def fill_sar_gaps(sar_db: np.ndarray, key: str) -> tuple[np.ndarray, int]:
    """SAR in dB as float32 with missing pixels filled, and how many were filled.

    Non-finite values (NaN, and -inf from log10 of a zero return) are missing. A band with more
    than MAX_SAR_NAN_FRACTION missing is rejected; otherwise its gaps take the band's minimum dB
    in the tile: missing returns are usually no-signal areas (shadow, borders), so the darkest
    observed value is the closest plausible backscatter. The minimum is per band because VH sits
    several dB below VV.
    """
    sar_db = sar_db.astype(np.float32)
    missing = ~np.isfinite(sar_db)
    num_missing = int(missing.sum())
    if num_missing == 0:
        return sar_db, 0
    band_pixels = sar_db.shape[-2] * sar_db.shape[-1]
    for band, band_missing in enumerate(missing):
        fraction = band_missing.sum() / band_pixels
        if fraction > MAX_SAR_NAN_FRACTION:
            raise NanTileError(
                key,
                f"SAR band {band} is {fraction:.0%} NaN (limit {MAX_SAR_NAN_FRACTION:.0%})",
                "remove the tile or re-export it",
            )
    filled = sar_db.copy()
    for band, band_missing in enumerate(missing):
        if band_missing.any():
            filled[band][band_missing] = sar_db[band][~band_missing].min()
    return filled, num_missing


def prepare_sar(raster: np.ndarray, key: str, policy: BadDataPolicy) -> np.ndarray:
    """A decoded Sentinel-1 raster as float32 VV, VH in dB with gaps filled (counted as
    "nan_filled" in the policy's counts)."""
    check_band_count(raster, SAR_BAND_COUNT, key, "Sentinel-1 image")
    sar_db, num_filled = fill_sar_gaps(raster, key)
    if num_filled:
        policy.note(
            "nan_filled",
            key,
            f"{key}: filled {num_filled} NaN pixels with the band's minimum dB",
            level=logging.INFO,
        )
    return sar_db


_ISO_DATE = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)")
_COMPACT_DATE = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)")


def date_in_name(name: str) -> datetime.date | None:
    """The first valid YYYY-MM-DD or YYYYMMDD date in `name`, else None."""
    for pattern in (_ISO_DATE, _COMPACT_DATE):
        for match in pattern.finditer(name):
            year, month, day = (int(part) for part in match.groups())
            try:
                return datetime.date(year, month, day)
            except ValueError:
                continue
    return None


def day_of_year_in_name(name: str) -> int:
    """Day of year (1..366) of the first valid date in `name` (see `date_in_name`), else 0."""
    date = date_in_name(name)
    return 0 if date is None else date.timetuple().tm_yday
