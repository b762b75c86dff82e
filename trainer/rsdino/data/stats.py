"""Per-band statistics measured on the training data, and the (mean, std) the trainer normalises by.

The shipped defaults in `rsdino.data.bands` are published values for typical Sentinel scenes; a
real dataset (another processing level, region or season) can differ a lot. `compute_stats`
measures every band in one streaming pass, `write_stats` stores the result as versioned JSON next
to the data, and `normalizer_stats` hands the trainer those numbers after checking that they
belong to the band layout being trained on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from rsdino.data.bands import S2_LAYOUTS, band_stats
from rsdino.data.bands import band_names as layout_band_names
from rsdino.data.sources.decode import SkipSample
from rsdino.data.storage import StorageError, Store, open_store
from rsdino.errors import RsdinoError

log = logging.getLogger(__name__)

STATS_FORMAT = "rsdino-band-stats"
STATS_VERSION = 1
DEFAULT_STATS_KEY = "band_stats.json"
# A constant band has zero spread; dividing by this floor instead maps it to ~0 after centring.
STD_EPSILON = 1e-6


@dataclass
class BandStatistics:
    """What one modality's bands look like over a dataset.

    `count` is the number of pixels seen per band; mean, std (population), minimum and maximum are
    over the finite ones, and `nan_count` says per band how many were NaN or infinite.
    """

    modality: str
    bands: tuple[str, ...]
    count: int
    mean: list[float]
    std: list[float]
    minimum: list[float]
    maximum: list[float]
    nan_count: list[int]


class StreamingBandStats:
    """Exact per-band mean and variance over data seen one batch at a time, in float64.

    Each batch is summarised on its own (count, mean, sum of squared deviations M2) and folded into
    the running totals with Chan et al.'s pairwise update, which avoids the cancellation of the
    naive sum-of-squares formula. Two streams merge the same way, so shards can be measured apart.
    """

    def __init__(self, n_bands: int) -> None:
        if n_bands < 1:
            raise ValueError(f"n_bands must be >= 1, got {n_bands}")
        self.n_bands = n_bands
        self._pixels = 0
        self._finite = np.zeros(n_bands, dtype=np.int64)
        self._mean = np.zeros(n_bands, dtype=np.float64)
        self._m2 = np.zeros(n_bands, dtype=np.float64)
        self._minimum = np.full(n_bands, np.inf)
        self._maximum = np.full(n_bands, -np.inf)

    def update(self, array: np.ndarray) -> None:
        """Add one sample [C, H, W] or a batch [B, C, H, W]; NaN and inf are counted, not used."""
        values = np.asarray(array)
        if values.ndim == 3:
            values = values[None]
        if values.ndim != 4 or values.shape[1] != self.n_bands:
            raise ValueError(
                f"expected [{self.n_bands}, H, W] or [B, {self.n_bands}, H, W], "
                f"got shape {values.shape}"
            )
        per_band = np.moveaxis(values, 1, 0).reshape(self.n_bands, -1).astype(np.float64)
        finite = np.isfinite(per_band)
        finite_count = finite.sum(axis=1)
        kept = np.where(finite, per_band, 0.0)
        mean = kept.sum(axis=1) / np.maximum(finite_count, 1)
        deviation = np.where(finite, per_band - mean[:, None], 0.0)
        batch = StreamingBandStats(self.n_bands)
        batch._pixels = per_band.shape[1]
        batch._finite = finite_count
        batch._mean = mean
        batch._m2 = np.einsum("ij,ij->i", deviation, deviation)
        batch._minimum = np.where(finite, per_band, np.inf).min(axis=1)
        batch._maximum = np.where(finite, per_band, -np.inf).max(axis=1)
        self.merge(batch)

    def merge(self, other: StreamingBandStats) -> None:
        """Fold in another stream over the same bands, as if its data had been seen here."""
        if other.n_bands != self.n_bands:
            raise ValueError(f"cannot merge {other.n_bands} bands into {self.n_bands}")
        own = self._finite.astype(np.float64)
        theirs = other._finite.astype(np.float64)
        total = np.maximum(own + theirs, 1.0)
        delta = other._mean - self._mean
        self._mean = self._mean + delta * theirs / total
        self._m2 = self._m2 + other._m2 + delta * delta * own * theirs / total
        self._finite = self._finite + other._finite
        self._pixels += other._pixels
        self._minimum = np.minimum(self._minimum, other._minimum)
        self._maximum = np.maximum(self._maximum, other._maximum)

    def result(self, modality: str, bands: tuple[str, ...]) -> BandStatistics:
        """The statistics so far, with the bands named; a constant band gets std `STD_EPSILON`."""
        if len(bands) != self.n_bands:
            raise ValueError(f"{len(bands)} band names given for {self.n_bands} bands")
        empty = [name for name, count in zip(bands, self._finite, strict=True) if count == 0]
        if empty:
            raise RsdinoError(
                f"{modality} bands {empty} have no finite pixel in {self._pixels} seen; "
                "check the data (all NaN/inf or no samples) before measuring statistics"
            )
        std = np.sqrt(self._m2 / self._finite)
        return BandStatistics(
            modality=modality,
            bands=tuple(bands),
            count=self._pixels,
            mean=self._mean.tolist(),
            std=_floor_std(modality, bands, std.tolist()),
            minimum=self._minimum.tolist(),
            maximum=self._maximum.tolist(),
            nan_count=(self._pixels - self._finite).tolist(),
        )


def _floor_std(modality: str, bands: Sequence[str], std: list[float]) -> list[float]:
    """Std with constant bands raised to `STD_EPSILON`, so normalising never divides by zero."""
    floored = []
    for name, value in zip(bands, std, strict=True):
        if value < STD_EPSILON:
            log.warning(
                "%s band %s is constant (std %g); using std %g so normalisation stays finite",
                modality,
                name,
                value,
                STD_EPSILON,
            )
            value = STD_EPSILON
        floored.append(value)
    return floored


def _sample_indices(size: int, max_samples: int | None, seed: int) -> list[int]:
    """All indices, or a reproducible random subset of `max_samples`, in reading order."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if max_samples is None or max_samples >= size:
        return list(range(size))
    chosen = np.random.default_rng(seed).choice(size, size=max_samples, replace=False)
    return sorted(int(index) for index in chosen)


class _ModalityReader(Dataset):
    """The wanted arrays of a subset of samples, or None for a sample the source skips.

    Returning only the arrays keeps what loader workers send back small; returning None instead
    of raising lets one bad sample pass through a worker without ending the pass.
    """

    def __init__(self, dataset: Dataset, indices: list[int], modalities: tuple[str, ...]) -> None:
        self.dataset = dataset
        self.indices = indices
        self.modalities = modalities

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[str, dict[str, np.ndarray]] | None:
        try:
            sample = self.dataset[self.indices[position]]
        except SkipSample:
            return None
        key = str(sample.get("key", self.indices[position]))
        missing = [name for name in self.modalities if name not in sample]
        if missing:
            raise RsdinoError(
                f"sample {key} has no {missing} data (it has {sorted(sample)}); measure only the "
                "modalities the dataset provides"
            )
        return key, {name: np.asarray(sample[name]) for name in self.modalities}


def _unchanged(item: Any) -> Any:
    """The loader's collate step: samples arrive one at a time and stay as they are."""
    return item


def compute_stats(
    dataset: Dataset,
    *,
    modalities: tuple[str, ...],
    band_names: dict[str, tuple[str, ...]],
    max_samples: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
) -> dict[str, BandStatistics]:
    """Measure every band of `modalities` over the dataset, or over `max_samples` of it.

    Pass the raw source, not one wrapped in `SkipBadSamples`: samples the source skips are left
    out here, whereas the wrapper would count their replacements twice. `seed` picks the subset.
    """
    unnamed = [name for name in modalities if name not in band_names]
    if unnamed:
        raise ValueError(f"no band names given for modalities {unnamed}")
    if len(dataset) == 0:
        raise RsdinoError("the dataset is empty; check the dataset path and its contents")
    reader = _ModalityReader(dataset, _sample_indices(len(dataset), max_samples, seed), modalities)
    loader = DataLoader(reader, batch_size=None, num_workers=num_workers, collate_fn=_unchanged)
    streams = {name: StreamingBandStats(len(band_names[name])) for name in modalities}
    used = skipped = 0
    for item in loader:
        if item is None:
            skipped += 1
            continue
        key, arrays = item
        for name, array in arrays.items():
            try:
                streams[name].update(array)
            except ValueError as error:
                raise RsdinoError(
                    f"sample {key}: {name} does not match bands {band_names[name]}: {error}"
                ) from error
        used += 1
    if used == 0:
        raise RsdinoError(f"all {skipped} samples read were skipped as bad; see the data errors")
    log.info("band statistics measured on %d samples (%d skipped as bad)", used, skipped)
    return {name: streams[name].result(name, band_names[name]) for name in modalities}


def write_stats(
    stats: dict[str, BandStatistics], store_or_path: Store | str, key: str = DEFAULT_STATS_KEY
) -> None:
    """Save statistics as JSON under `key` of a store, or of a local folder / storage URI."""
    store = open_store(store_or_path) if isinstance(store_or_path, str) else store_or_path
    document = {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "modalities": {name: asdict(entry) for name, entry in stats.items()},
    }
    store.write(key, json.dumps(document, indent=2, allow_nan=False).encode("utf-8"))


def _read_document(path_or_uri: str) -> bytes:
    """The bytes of a local file or of an object named by a storage URI."""
    try:
        if "://" in path_or_uri:
            root, _, key = path_or_uri.rpartition("/")
            return open_store(root).read(key)
        path = Path(path_or_uri).expanduser()
        return open_store(str(path.parent)).read(path.name)
    except StorageError as error:
        raise RsdinoError(
            f"cannot read the band statistics file {path_or_uri}: {error}; "
            "create it with `rsdino data stats` or fix the path"
        ) from error


def _parse_entry(name: str, entry: dict[str, Any]) -> BandStatistics:
    """One modality's statistics, checked against the band layouts that modality can have."""
    stats = BandStatistics(
        modality=name,
        bands=tuple(str(band) for band in entry["bands"]),
        count=int(entry["count"]),
        mean=[float(value) for value in entry["mean"]],
        std=[float(value) for value in entry["std"]],
        minimum=[float(value) for value in entry["minimum"]],
        maximum=[float(value) for value in entry["maximum"]],
        nan_count=[int(value) for value in entry["nan_count"]],
    )
    layouts = {layout: layout_band_names(name, layout) for layout in S2_LAYOUTS}
    if stats.bands not in layouts.values():
        expected = ", ".join(
            f"{len(bands)} {bands} ({layout})" for layout, bands in layouts.items()
        )
        raise ValueError(f"{name} has {len(stats.bands)} bands {stats.bands}; expected {expected}")
    per_band = (stats.mean, stats.std, stats.minimum, stats.maximum, stats.nan_count)
    if any(len(values) != len(stats.bands) for values in per_band):
        raise ValueError(f"{name} lists do not all have one value per band ({len(stats.bands)})")
    if not all(math.isfinite(value) and value > 0 for value in stats.std):
        raise ValueError(f"{name} std must be finite and positive, got {stats.std}")
    return stats


def load_stats(path_or_uri: str) -> dict[str, BandStatistics]:
    """Statistics saved by `write_stats`, from a local path or a storage URI, fully checked."""
    raw = _read_document(path_or_uri)
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RsdinoError(
            f"{path_or_uri} is not valid JSON ({error}); recreate it with `rsdino data stats`"
        ) from error
    if not isinstance(document, dict) or document.get("format") != STATS_FORMAT:
        raise RsdinoError(f"{path_or_uri} is not an rsdino band statistics file")
    if document.get("version") != STATS_VERSION:
        raise RsdinoError(
            f"{path_or_uri} has format version {document.get('version')!r}, this rsdino reads "
            f"version {STATS_VERSION}; recreate it with `rsdino data stats`"
        )
    try:
        return {name: _parse_entry(name, entry) for name, entry in document["modalities"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RsdinoError(
            f"{path_or_uri} has malformed band statistics ({error!r}); "
            "recreate it with `rsdino data stats`"
        ) from error


def _picked(values: Sequence[Any], bands: Sequence[int]) -> list[Any]:
    """``values`` of the 1-based ``bands`` in their order, or all of them for no ``bands``."""
    return [values[band - 1] for band in bands] if bands else list(values)


def input_band_names(modality: str, layout: str, bands: Sequence[int] = ()) -> tuple[str, ...]:
    """The bands a model sees: the layout's, or the GeoTIFF ``bands`` picked from it (S2 only)."""
    names = layout_band_names(modality, layout)
    return tuple(_picked(names, bands)) if modality == "s2" else names


def normalizer_stats(
    stats_file: str | None, modality: str, layout: str, bands: Sequence[int] = ()
) -> tuple[list[float], list[float]]:
    """The (mean, std) to normalise `modality` by: measured if a file is given, else defaults.

    ``bands`` (``train.dataset.bands``: 1-based, into the layout's band order, which the GeoTIFF
    files follow) keeps the statistics of the picked Sentinel-2 bands only.
    """
    picks = bands if modality == "s2" else ()
    if stats_file is None:
        mean, std = band_stats(modality, layout)
        return _picked(mean, picks), _picked(std, picks)
    stats = load_stats(stats_file)
    if modality not in stats:
        raise RsdinoError(
            f"{stats_file} has no {modality} statistics (it has {sorted(stats)}); "
            f"measure {modality} with `rsdino data stats`"
        )
    entry = stats[modality]
    expected = layout_band_names(modality, layout)
    if entry.bands != expected:
        raise RsdinoError(
            f"{stats_file} has {modality} bands {entry.bands} but layout {layout!r} trains on "
            f"{expected}; measure statistics on this dataset or set the matching layout"
        )
    return _picked(entry.mean, picks), _picked(entry.std, picks)
