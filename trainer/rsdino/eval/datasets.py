"""Labelled evaluation data: shared sample format, band reordering, splits, and scene folders.

Every reader yields samples shaped like training samples, so the same normalisers and encoder
inputs apply: ``"s2"`` uint16 [C, H, W] reflectance x10000 in the model's band layout, ``"s1"``
float32 [2, H, W] VV/VH in dB (when the data has SAR), ``"key"`` the file or folder, and one
target: ``"label"`` (scene class id), ``"labels"`` (float32 multi-hot) or ``"mask"`` (int64
[H, W] class ids). Files are read through a :class:`~rsdino.data.storage.Store`, so local folders
and ``s3://`` prefixes work the same.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from rsdino.data.band_tables import EUROSAT_BANDS
from rsdino.data.bands import band_names
from rsdino.data.sources.decode import (
    BandCountError,
    DataError,
    ShapeMismatchError,
    decode_geotiff,
    to_reflectance_uint16,
)
from rsdino.data.storage import Store
from rsdino.errors import ExitCode, RsdinoError

SPLITS = ("train", "val", "test")
TIFF_SUFFIXES = (".tif", ".tiff")


class EvalDataError(RsdinoError):
    """An evaluation dataset that cannot be used as given (layout, split file, labels)."""

    exit_code = ExitCode.DATA


@dataclass(frozen=True)
class LabelledSplits:
    """Train, validation and test sets of one labelled dataset, and what their targets mean.

    ``task`` is "scene" (one class per sample), "multilabel" or "segmentation". ``identity`` is
    a string that changes whenever the samples would (used to key the feature cache).
    """

    task: str
    class_names: tuple[str, ...]
    train: Dataset
    val: Dataset
    test: Dataset
    modalities: tuple[str, ...]
    identity: str
    ignore_index: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Dataset:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def reorder_bands(
    raster: np.ndarray,
    file_bands: Sequence[str],
    layout: str,
    key: str,
    fill: dict[str, float] | None = None,
) -> np.ndarray:
    """A raster whose bands are ``file_bands`` as the model's ``layout`` band order.

    Bands of the layout the file lacks are filled with ``fill[band]`` (e.g. B10, absent from
    L2A products) when given, else the file is rejected.
    """
    if raster.shape[0] != len(file_bands):
        raise BandCountError(
            key,
            f"has {raster.shape[0]} bands, expected {len(file_bands)} ({', '.join(file_bands)})",
            "check that the file belongs to this dataset layout",
        )
    fill = fill or {}
    rows = []
    for band in band_names("s2", layout):
        if band in file_bands:
            rows.append(raster[file_bands.index(band)])
        elif band in fill:
            rows.append(np.full(raster.shape[1:], fill[band], dtype=raster.dtype))
        else:
            raise BandCountError(
                key,
                f"has no band {band}, which the model's {layout!r} layout needs",
                "use data with that band or pass a fill value for it",
            )
    return np.stack(rows)


def check_size(array: np.ndarray, size: int | None, key: str) -> None:
    """Reject a tile whose height or width differs from the dataset's ``size``."""
    if size is not None and tuple(array.shape[-2:]) != (size, size):
        raise ShapeMismatchError(
            key,
            f"is {array.shape[-2]}x{array.shape[-1]} pixels, expected {size}x{size}",
            "remove the file or pass the dataset's real tile size",
        )


def resize_band(band: np.ndarray, size: int) -> np.ndarray:
    """One band [H, W] resampled bilinearly to [size, size] (coarser bands onto the 10 m grid)."""
    if band.shape == (size, size):
        return band
    resized = F.interpolate(
        torch.from_numpy(band.astype(np.float32))[None, None],
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    return resized.numpy()


def read_raster(store: Store, key: str) -> np.ndarray:
    """Decode one GeoTIFF of the store; a missing file is a data error naming it."""
    if not store.exists(key):
        raise DataError(key, "is missing", "check the dataset folder and the split/label files")
    return decode_geotiff(store.read(key), key)


def seeded_split(
    groups: dict[str, list[int]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Indices per split, stratified by group (class), reproducible for a given seed."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise EvalDataError(
            f"split fractions val={val_fraction}, test={test_fraction} must be in [0, 1) and "
            "leave some training data"
        )
    rng = np.random.default_rng(seed)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for group in sorted(groups):
        members = np.array(groups[group])
        rng.shuffle(members)
        n_test = round(test_fraction * len(members))
        n_val = round(val_fraction * len(members))
        splits["test"].extend(members[:n_test].tolist())
        splits["val"].extend(members[n_test : n_test + n_val].tolist())
        splits["train"].extend(members[n_test + n_val :].tolist())
    return {name: sorted(indices) for name, indices in splits.items()}


def read_split_lists(store: Store, split_dir: str) -> dict[str, set[str]]:
    """File stems per split from ``train.txt``, ``val.txt`` and ``test.txt`` in ``split_dir``.

    Lines may name files with any extension or folder (EuroSAT's published lists name the RGB
    JPEGs), so entries are matched by stem.
    """
    lists = {}
    for name in SPLITS:
        key = posixpath.join(split_dir, f"{name}.txt") if split_dir else f"{name}.txt"
        if not store.exists(key):
            raise EvalDataError(f"split file {store.uri.rstrip('/')}/{key} is missing")
        lines = store.read(key).decode().splitlines()
        lists[name] = {_stem(line.strip()) for line in lines if line.strip()}
    return lists


def _stem(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def assign_listed(
    names: list[str], lists: dict[str, set[str]], source: str
) -> dict[str, list[int]]:
    """Indices per split of ``names`` (file keys) from split lists; unknown entries are errors."""
    index_of = {_stem(name): index for index, name in enumerate(names)}
    splits = {}
    for split, stems in lists.items():
        unknown = sorted(stems - set(index_of))
        if unknown:
            raise EvalDataError(
                f"{split}.txt in {source} names {len(unknown)} file(s) not in the dataset, "
                f"e.g. {unknown[0]!r}"
            )
        splits[split] = sorted(index_of[stem] for stem in stems)
    return splits


class Subset(Dataset):
    """Some indices of a reader, in order."""

    def __init__(self, source: Dataset, indices: list[int]) -> None:
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[self.indices[index]]


class SceneFolder(Dataset):
    """EuroSAT-MS style scene classification: ``<Class>/<Class>_<n>.tif``, one folder per class.

    Class ids follow the sorted folder names. Files are 13-band GeoTIFFs in ``file_bands`` order
    (EuroSAT's by default) of ``size`` x ``size`` pixels, returned in the model's ``layout``.
    """

    def __init__(
        self,
        store: Store,
        layout: str = "sen12ms",
        file_bands: Sequence[str] = EUROSAT_BANDS,
        size: int | None = 64,
        fill: dict[str, float] | None = None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.file_bands = tuple(file_bands)
        self.size = size
        self.fill = fill
        keys = [key for key in store.list("") if key.lower().endswith(TIFF_SUFFIXES)]
        self.keys: list[str] = []
        classes = set()
        for key in keys:
            parts = key.split("/")
            if len(parts) != 2:
                continue  # split files, READMEs and other folders are not samples
            folder, name = parts
            if not name.startswith(f"{folder}_"):
                raise EvalDataError(
                    f"{store.uri.rstrip('/')}/{key}: file name does not start with its class "
                    f"folder {folder!r}; expected <Class>/<Class>_<n>.tif"
                )
            classes.add(folder)
            self.keys.append(key)
        if not self.keys:
            raise EvalDataError(
                f"no <Class>/<Class>_<n>.tif files under {store.uri}; expected the EuroSAT-MS "
                "layout"
            )
        self.class_names = tuple(sorted(classes))
        self.labels = [self.class_names.index(key.split("/")[0]) for key in self.keys]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        raster = read_raster(self.store, key)
        location = f"{self.store.uri.rstrip('/')}/{key}"
        check_size(raster, self.size, location)
        s2 = reorder_bands(raster, self.file_bands, self.layout, location, self.fill)
        return {"s2": to_reflectance_uint16(s2), "label": self.labels[index], "key": key}


def scene_splits(
    store: Store,
    *,
    layout: str = "sen12ms",
    file_bands: Sequence[str] = EUROSAT_BANDS,
    size: int | None = 64,
    split_dir: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    fill: dict[str, float] | None = None,
) -> LabelledSplits:
    """A scene folder split by ``split_dir``'s lists, or by a seeded stratified split."""
    folder = SceneFolder(store, layout, file_bands, size, fill)
    if split_dir is not None:
        lists = read_split_lists(store, split_dir)
        indices = assign_listed(folder.keys, lists, f"{store.uri.rstrip('/')}/{split_dir}")
        split_desc = f"lists:{split_dir}"
    else:
        groups: dict[str, list[int]] = {}
        for index, label in enumerate(folder.labels):
            groups.setdefault(str(label), []).append(index)
        indices = seeded_split(groups, val_fraction, test_fraction, seed)
        split_desc = f"seeded:{val_fraction}:{test_fraction}:{seed}"
    return LabelledSplits(
        task="scene",
        class_names=folder.class_names,
        train=Subset(folder, indices["train"]),
        val=Subset(folder, indices["val"]),
        test=Subset(folder, indices["test"]),
        modalities=("s2",),
        identity=f"scene|{store.uri}|{len(folder)}|{layout}|{size}|{split_desc}",
    )
