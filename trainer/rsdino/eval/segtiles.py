"""Segmentation tiles: an image GeoTIFF and a single-band label GeoTIFF of the same name.

Layout under the dataset root: ``images/<name>.tif`` (Sentinel-2, bands in ``file_bands``
order), ``labels/<name>.tif`` (class ids; ``ignore_index`` marks unlabelled pixels) and, for
multimodal data, ``s1/<name>.tif`` (VV, VH in dB). Splits come from ``train.txt``/``val.txt``/
``test.txt`` lists or a seeded split.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from rsdino.data.band_tables import modalities_of
from rsdino.data.bands import band_names
from rsdino.data.sources.decode import (
    BadDataPolicy,
    DataError,
    check_same_size,
    prepare_sar,
    to_reflectance_uint16,
)
from rsdino.data.storage import Store
from rsdino.eval.datasets import (
    TIFF_SUFFIXES,
    EvalDataError,
    LabelledSplits,
    Subset,
    assign_listed,
    check_size,
    read_raster,
    read_split_lists,
    reorder_bands,
    seeded_split,
)


class SegmentationTiles(Dataset):
    """Samples {"s2", optional "s1", "mask": int64 [H, W], "key"} of the tile layout."""

    def __init__(
        self,
        store: Store,
        num_classes: int,
        ignore_index: int = 255,
        layout: str = "sen12ms",
        file_bands: Sequence[str] | None = None,
        size: int | None = None,
        with_s1: bool | None = None,
        fill: dict[str, float] | None = None,
    ) -> None:
        if num_classes < 2:
            raise EvalDataError(f"segmentation needs at least 2 classes, got {num_classes}")
        self.store = store
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.layout = layout
        self.file_bands = tuple(file_bands or band_names("s2", layout))
        self.size = size
        self.fill = fill
        self.names = [
            posixpath.basename(key)
            for key in store.list("images/")
            if key.count("/") == 1 and key.lower().endswith(TIFF_SUFFIXES)
        ]
        if not self.names:
            raise EvalDataError(f"no images/<name>.tif under {store.uri}")
        if with_s1 is None:
            with_s1 = store.exists(f"s1/{self.names[0]}")
        self.modalities = modalities_of(with_s1)
        self._policy = BadDataPolicy("fail")

    def __len__(self) -> int:
        return len(self.names)

    def _location(self, key: str) -> str:
        return f"{self.store.uri.rstrip('/')}/{key}"

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        image_key, label_key = f"images/{name}", f"labels/{name}"
        raster = read_raster(self.store, image_key)
        check_size(raster, self.size, self._location(image_key))
        s2 = reorder_bands(
            raster, self.file_bands, self.layout, self._location(image_key), self.fill
        )
        label = read_raster(self.store, label_key)
        if label.shape[0] != 1:
            raise DataError(
                self._location(label_key),
                f"has {label.shape[0]} bands, a label raster has one",
                "write class ids as a single-band GeoTIFF",
            )
        check_same_size(raster, label, self._location(label_key), "image vs label raster")
        mask = label[0].astype(np.int64)
        self._check_values(mask, self._location(label_key))
        sample = {"s2": to_reflectance_uint16(s2), "mask": mask, "key": name}
        if "s1" in self.modalities:
            s1_key = f"s1/{name}"
            sar = prepare_sar(read_raster(self.store, s1_key), self._location(s1_key), self._policy)
            check_same_size(raster, sar, self._location(s1_key), "Sentinel-2 vs Sentinel-1")
            sample["s1"] = sar
        return sample

    def _check_values(self, mask: np.ndarray, location: str) -> None:
        valid = (mask >= 0) & (mask < self.num_classes) | (mask == self.ignore_index)
        if not valid.all():
            bad = sorted(set(np.unique(mask[~valid]).tolist()))
            raise DataError(
                location,
                f"has label values {bad[:5]} outside 0..{self.num_classes - 1} and "
                f"ignore_index {self.ignore_index}",
                "pass the right number of classes or ignore_index",
            )


def segmentation_splits(
    store: Store,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
    layout: str = "sen12ms",
    file_bands: Sequence[str] | None = None,
    size: int | None = None,
    split_dir: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    fill: dict[str, float] | None = None,
) -> LabelledSplits:
    """Tiles split by lists in ``split_dir`` or by a seeded split."""
    if class_names is not None and len(class_names) != num_classes:
        raise EvalDataError(f"{len(class_names)} class names given for {num_classes} classes")
    tiles = SegmentationTiles(store, num_classes, ignore_index, layout, file_bands, size, fill=fill)
    if split_dir is not None:
        lists = read_split_lists(store, split_dir)
        indices = assign_listed(tiles.names, lists, f"{store.uri.rstrip('/')}/{split_dir}")
        split_desc = f"lists:{split_dir}"
    else:
        everything = {"all": list(range(len(tiles)))}
        indices = seeded_split(everything, val_fraction, test_fraction, seed)
        split_desc = f"seeded:{val_fraction}:{test_fraction}:{seed}"
    names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(num_classes))
    return LabelledSplits(
        task="segmentation",
        class_names=names,
        train=Subset(tiles, indices["train"]),
        val=Subset(tiles, indices["val"]),
        test=Subset(tiles, indices["test"]),
        modalities=tiles.modalities,
        identity=f"segmentation|{store.uri}|{len(tiles)}|{layout}|{size}|{split_desc}|"
        f"{num_classes}|{ignore_index}",
        ignore_index=ignore_index,
    )
