"""SEN12MS-CR-TS: co-registered Sentinel-1 and Sentinel-2 acquisitions as GeoTIFF pairs.

Tree layout (the dataset as downloaded)::

    ROIs<id>/<tile>/S1/<t>/s1_ROIs<id>_<tile>_ImgNo_<t>_<YYYY-MM-DD>_patch_<n>.tif
    ROIs<id>/<tile>/S2/<t>/s2_ROIs<id>_<tile>_ImgNo_<t>_<YYYY-MM-DD>_patch_<n>.tif

`<t>` is the time index (0..29) and `<n>` the patch within the tile. Sentinel-1 and Sentinel-2 of
one sample share ROI, tile, time index and patch, but not the date: each name carries its own
acquisition date. The loader relies only on the folders, the `_patch_<n>` suffix (optional: without
it a time folder holds one file per sensor) and the first date in the name. Splits follow the
official ROI split of SEN12MS-CR-TS: "test" and "val" are fixed ROI lists, "train" is every other
ROI, "all" is everything.

Pair-list layout: a JSON file (default `<split>_all.json` at the root) holding a list of
[s1_key, s2_key], keys relative to the dataset root.

Sentinel-2 is 13-band L1C reflectance x10000 (uint16). Sentinel-1 is 2-band VV, VH backscatter
already in dB (float32): SEN12MS-CR-TS ships it in dB, so no log transform is applied here.
"""

from __future__ import annotations

import datetime
import json
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from rsdino.data.bands import S2_BANDS_SEN12MS
from rsdino.data.seasonal import SeasonalViews
from rsdino.data.sources.decode import (
    BadDataPolicy,
    DataError,
    ListKeys,
    MissingPartnerError,
    ReadBytes,
    check_band_count,
    check_same_size,
    date_in_name,
    decode_geotiff,
    prepare_sar,
    to_reflectance_uint16,
)

LAYOUTS = ("tree", "pairs")
TREE_SPLITS = ("train", "val", "test", "all")
# Official SEN12MS-CR-TS ROI split (ROI folder/tile): a fixed test and validation set across
# continents; every other ROI is for training.
TEST_ROIS = frozenset(
    {
        "ROIs1868/119",
        "ROIs1970/139",
        "ROIs2017/108",
        "ROIs2017/63",
        "ROIs1158/106",
        "ROIs1868/73",
        "ROIs2017/32",
        "ROIs1868/100",
        "ROIs1970/132",
        "ROIs2017/103",
        "ROIs1868/142",
        "ROIs1970/20",
        "ROIs2017/140",
    }
)
VAL_ROIS = frozenset({"ROIs2017/22", "ROIs1970/65", "ROIs2017/117", "ROIs1868/127", "ROIs1868/17"})

_TREE_FILE = re.compile(
    r"^(?P<roi>ROIs\d+)/(?P<tile>\d+)/(?P<sensor>S1|S2)/(?P<time>\d+)/(?P<name>[^/]+\.tiff?)$",
    re.IGNORECASE,
)
_PATCH_SUFFIX = re.compile(r"_patch_(\d+)\.tiff?$", re.IGNORECASE)
_NO_PATCH = -1


@dataclass(frozen=True)
class _Pair:
    """The files of one sample; `s1` is None for Sentinel-2-only sources."""

    s2: str
    s1: str | None
    doy: int
    date: datetime.date | None  # of the Sentinel-2 acquisition (Sentinel-1's if S2 has none)
    patch: tuple[str, str, int] | None  # (ROI, tile, patch) of tree names: its time series


def _roi_split(roi_and_tile: str) -> str:
    if roi_and_tile in TEST_ROIS:
        return "test"
    if roi_and_tile in VAL_ROIS:
        return "val"
    return "train"


def _pair(s2_key: str, s1_key: str | None) -> _Pair:
    """A sample's files with its date (the Sentinel-2 one, or Sentinel-1's when the S2 name has
    none) and, for names in the tree layout, the patch whose time series it belongs to."""
    date = date_in_name(posixpath.basename(s2_key))
    if date is None and s1_key is not None:
        date = date_in_name(posixpath.basename(s1_key))
    doy = 0 if date is None else date.timetuple().tm_yday
    match = _TREE_FILE.match(s2_key)
    patch = None
    if match is not None:
        suffix = _PATCH_SUFFIX.search(match["name"])
        patch = (match["roi"], match["tile"], int(suffix[1]) if suffix else _NO_PATCH)
    return _Pair(s2=s2_key, s1=s1_key, doy=doy, date=date, patch=patch)


class Sen12MSSource(Dataset):
    """SEN12MS-CR-TS samples {"s1", "s2", "doy", "key", "label": -1}; "s1" only if multimodal.

    `on_error="skip"` drops samples without a partner while indexing and raises `SkipSample` for
    files that turn out bad when read (wrap the source in `SkipBadSamples`); `"fail"` raises the
    `DataError`. `error_counts` counts bad keys per kind, plus "nan_filled" for SAR tiles whose
    few NaNs were filled.
    """

    def __init__(
        self,
        list_keys: ListKeys,
        read_bytes: ReadBytes,
        split: str = "train",
        layout: str = "tree",
        pairs_file: str | None = None,
        multimodal: bool = True,
        on_error: str = "skip",
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "tree" and split not in TREE_SPLITS:
            raise ValueError(
                f"split must be one of {TREE_SPLITS} for the tree layout, got {split!r}"
            )
        self.split = split
        self.layout = layout
        self.multimodal = multimodal
        self._read_bytes = read_bytes
        self.bad_data = BadDataPolicy(on_error)
        self.cloudy_left_out = 0  # acquisitions a cloud filter removed (data.build.drop_cloudy)
        self.seasonal: SeasonalViews | None = None
        self.cloudy: frozenset[str] | None = None  # S2 keys marked by ``mark_cloudy``
        self._partners: list[int] = []  # per sample, its second date's index (itself: none)
        if layout == "tree":
            self._pairs = self._index_tree(list_keys(""))
        else:
            self._pairs = self._index_pair_list(list_keys, pairs_file or f"{split}_all.json")

    @property
    def error_counts(self) -> dict[str, int]:
        return self.bad_data.error_counts

    @property
    def keys(self) -> list[str]:
        """Sample keys: the Sentinel-2 file of each sample."""
        return [pair.s2 for pair in self._pairs]

    def __len__(self) -> int:
        return len(self._pairs)

    def keep_only(self, keep: Callable[[str], bool]) -> int:
        """Keep the samples whose Sentinel-2 key passes ``keep`` (e.g. clear enough); returns how
        many were left out. Done before any loader or sampler sees the source."""
        kept = [pair for pair in self._pairs if keep(pair.s2)]
        left_out = len(self._pairs) - len(kept)
        self._pairs = kept
        return left_out

    def mark_cloudy(self, keys: set[str]) -> None:
        """Serve every sample with ``cloudy`` (and ``cloudy_b`` for a second date): whether its
        Sentinel-2 key is in ``keys``, so the student can be shown its Sentinel-1 alone."""
        self.cloudy = frozenset(keys)

    def enable_seasonal_views(self, views: SeasonalViews) -> None:
        """Serve each sample with a second date of its patch (``*_b`` fields, ``days_apart``).

        Call it after any filter (``keep_only``), so partners come from the kept acquisitions.
        A sample without a date in the window gets itself as second date (``days_apart`` 0).
        Each partner is drawn once here from ``(views.seed, index)``: the same for every epoch,
        rank and loader worker, and no draw per sample read.
        """
        series: dict[tuple[str, str, int], list[int]] = {}
        for index, pair in enumerate(self._pairs):
            if pair.patch is not None and pair.date is not None:
                series.setdefault(pair.patch, []).append(index)
        self._partners = []
        for index, pair in enumerate(self._pairs):
            candidates = [
                other
                for other in (series.get(pair.patch, []) if pair.date is not None else [])
                if other != index
                and views.min_days_apart <= self._days_apart(index, other) <= views.max_days_apart
            ]
            partner = index
            if candidates:
                draw = np.random.default_rng([views.seed, index]).integers(len(candidates))
                partner = candidates[int(draw)]
            self._partners.append(partner)
        self.seasonal = views

    @property
    def samples_with_second_date(self) -> int:
        """How many samples have another date of their patch in the seasonal window."""
        return sum(partner != index for index, partner in enumerate(self._partners))

    def _days_apart(self, index: int, other: int) -> int:
        return abs((self._pairs[other].date - self._pairs[index].date).days)

    def __getitem__(self, index: int) -> dict:
        pair = self._pairs[index]
        try:
            sample = self._read(pair)
            if self.seasonal is not None:
                sample.update(self._second_date(index, sample))
            if self.cloudy is not None:
                sample["cloudy"] = pair.s2 in self.cloudy
                if "key_b" in sample:
                    sample["cloudy_b"] = sample["key_b"] in self.cloudy
            return sample
        except DataError as error:
            self.bad_data.at_read(error)

    def _second_date(self, index: int, first: dict) -> dict:
        """The ``*_b`` fields of a seasonal sample: its partner's images and day of year."""
        partner = self._partners[index]
        second, days = first, 0
        if partner != index:
            second = self._read(self._pairs[partner])
            check_same_size(second["s2"], first["s2"], second["key"], "dates of one patch differ")
            days = self._days_apart(index, partner)
        fields = {f"{name}_b": second[name] for name in ("s1", "s2", "doy", "key") if name in first}
        return {**fields, "days_apart": days}

    def _index_tree(self, keys: list[str]) -> list[_Pair]:
        """Group tree files by (ROI, tile, time, patch) and pair the sensors of each group."""
        groups: dict[tuple[str, int, int, int], dict[str, str]] = {}
        for key in keys:
            match = _TREE_FILE.match(key)
            if match is None:
                continue
            roi, tile, sensor = match["roi"], match["tile"], match["sensor"].upper()
            if self.split != "all" and _roi_split(f"{roi}/{tile}") != self.split:
                continue
            if sensor == "S1" and not self.multimodal:
                continue
            patch = _PATCH_SUFFIX.search(match["name"])
            group_id = (roi, int(tile), int(match["time"]), int(patch[1]) if patch else _NO_PATCH)
            sensors = groups.setdefault(group_id, {})
            if sensor in sensors:
                raise ValueError(
                    f"two {sensor} files for one acquisition: {sensors[sensor]} and {key}; "
                    "name them with distinct _patch_<n> suffixes"
                )
            sensors[sensor] = key
        pairs = []
        for group_id in sorted(groups):
            sensors = groups[group_id]
            pair = self._tree_pair(sensors.get("S1"), sensors.get("S2"))
            if pair is not None:
                pairs.append(pair)
        return pairs

    def _index_pair_list(self, list_keys: ListKeys, pairs_file: str) -> list[_Pair]:
        """Read [s1, s2] pairs from `pairs_file`; a pair with a listed file absent is missing."""
        entries = json.loads(self._read_bytes(pairs_file))
        well_formed = isinstance(entries, list) and all(
            isinstance(entry, list) and len(entry) == 2 and all(isinstance(k, str) for k in entry)
            for entry in entries
        )
        if not well_formed:
            raise ValueError(f"{pairs_file} must hold a list of [s1_key, s2_key] pairs of strings")
        present = set(list_keys(""))
        pairs = []
        for s1_key, s2_key in entries:
            needed = [s2_key, s1_key] if self.multimodal else [s2_key]
            absent = [key for key in needed if key not in present]
            if absent:
                self.bad_data.at_index(
                    MissingPartnerError(
                        absent[0],
                        f"listed in {pairs_file} but absent",
                        "add the file or remove its pair from the list",
                    )
                )
                continue
            s1 = s1_key if self.multimodal else None
            pairs.append(_pair(s2_key, s1))
        return pairs

    def _tree_pair(self, s1_key: str | None, s2_key: str | None) -> _Pair | None:
        """The pair of one tree acquisition, or None (counted) when a partner is missing."""
        if s2_key is None:  # then the group holds its S1 file only
            self.bad_data.at_index(
                MissingPartnerError(
                    str(s1_key),
                    "Sentinel-1 file without its Sentinel-2 partner",
                    "add the Sentinel-2 file or remove this one",
                )
            )
            return None
        if self.multimodal and s1_key is None:
            self.bad_data.at_index(
                MissingPartnerError(
                    s2_key,
                    "Sentinel-2 file without its Sentinel-1 partner",
                    "add the Sentinel-1 file, remove this one, or set multimodal=False",
                )
            )
            return None
        return _pair(s2_key, s1_key)

    def _read(self, pair: _Pair) -> dict:
        s2 = decode_geotiff(self._read_bytes(pair.s2), pair.s2)
        check_band_count(s2, len(S2_BANDS_SEN12MS), pair.s2, "Sentinel-2 image")
        sample: dict = {}
        if pair.s1 is not None:
            sample["s1"] = self._read_sar(pair.s1, s2)
        sample.update(s2=to_reflectance_uint16(s2), doy=pair.doy, key=pair.s2, label=-1)
        return sample

    def _read_sar(self, key: str, s2: np.ndarray) -> np.ndarray:
        s1 = prepare_sar(decode_geotiff(self._read_bytes(key), key), key, self.bad_data)
        check_same_size(s1, s2, key, "Sentinel-1 and Sentinel-2 sizes differ")
        return s1
