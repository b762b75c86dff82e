"""Multi-label patches in the BigEarthNet layout, with labels from a metadata table.

One folder per patch, ``<patch>/<patch>_B01.tif`` ... ``_B12.tif``, ``_B8A.tif`` (single-band
Sentinel-2 files at 10, 20 or 60 m, resampled here onto one grid) and/or ``<patch>/<patch>_VV.tif``
and ``_VH.tif`` (Sentinel-1 in dB). Labels come from a table (CSV with ``patch_id``, ``labels``
separated by ``;`` and an optional ``split`` column; or JSON, a list of such records or a mapping
patch -> labels), or, without a table, from BigEarthNet v1's ``<patch>_labels_metadata.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from rsdino.data.band_tables import BIGEARTHNET_S2_BANDS
from rsdino.data.bands import band_names
from rsdino.data.sources.decode import fill_sar_gaps, to_reflectance_uint16
from rsdino.data.storage import Store
from rsdino.eval.datasets import (
    SPLITS,
    EvalDataError,
    LabelledSplits,
    Subset,
    check_size,
    read_raster,
    resize_band,
    seeded_split,
)

# The 19-class nomenclature of BigEarthNet (Sumbul et al. 2021), in its usual order.
BIGEARTHNET_19: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_ID_COLUMNS = ("patch_id", "patch", "name")


def _file_band(band: str) -> str:
    """Layout band name to BigEarthNet's file suffix: B1 -> B01, B8A -> B8A."""
    return band if band == "B8A" else f"B{int(band[1:]):02d}"


def _split_labels(text: str) -> list[str]:
    separator = ";" if ";" in text else "|"
    return [label.strip() for label in text.split(separator) if label.strip()]


def parse_label_table(data: bytes, source: str) -> dict[str, tuple[list[str], str | None]]:
    """{patch: (label names, split or None)} from a CSV or JSON metadata table."""
    text = data.decode("utf-8-sig")
    if source.lower().endswith(".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"label table {source} is not valid JSON ({error})") from error
        if isinstance(document, dict):
            return {str(patch): (list(labels), None) for patch, labels in document.items()}
        records = document
    else:
        records = list(csv.DictReader(io.StringIO(text)))
    table = {}
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise EvalDataError(f"label table {source}: record {number} is not an object")
        id_column = next((name for name in _ID_COLUMNS if name in record), None)
        if id_column is None or "labels" not in record:
            raise EvalDataError(
                f"label table {source}: record {number} needs a patch_id and a labels field"
            )
        labels = record["labels"]
        labels = _split_labels(labels) if isinstance(labels, str) else list(labels)
        split = record.get("split") or None
        if split is not None and split not in _SPLIT_NAMES:
            raise EvalDataError(
                f"label table {source}: patch {record[id_column]} has split {split!r}; "
                f"expected one of {sorted(_SPLIT_NAMES)}"
            )
        table[str(record[id_column])] = (labels, _SPLIT_NAMES[split] if split else None)
    if not table:
        raise EvalDataError(f"label table {source} has no records")
    return table


def _labels_from_patch_metadata(store: Store) -> dict[str, tuple[list[str], str | None]]:
    """BigEarthNet v1: every ``<patch>/<patch>_labels_metadata.json`` under the root."""
    table = {}
    for key in store.list(""):
        folder, _, name = key.partition("/")
        if name == f"{folder}_labels_metadata.json":
            document = json.loads(store.read(key))
            table[folder] = (list(document["labels"]), None)
    if not table:
        raise EvalDataError(
            f"no label table given and no <patch>/<patch>_labels_metadata.json under {store.uri}"
        )
    return table


class MultiLabelPatches(Dataset):
    """BigEarthNet-style patches: ``modalities`` read from the folder, multi-hot ``labels``."""

    def __init__(
        self,
        store: Store,
        patches: list[str],
        targets: np.ndarray,
        modalities: Sequence[str],
        layout: str = "sen12ms",
        size: int = 120,
        fill: dict[str, float] | None = None,
    ) -> None:
        self.store = store
        self.patches = patches
        self.targets = targets
        self.modalities = tuple(modalities)
        self.layout = layout
        self.size = size
        self.fill = fill or {}

    def __len__(self) -> int:
        return len(self.patches)

    def _location(self, key: str) -> str:
        return f"{self.store.uri.rstrip('/')}/{key}"

    def _band(self, patch: str, band: str) -> np.ndarray:
        key = f"{patch}/{patch}_{band}.tif"
        raster = read_raster(self.store, key)
        if raster.shape[0] != 1:
            raise EvalDataError(f"{self._location(key)} has {raster.shape[0]} bands, expected 1")
        return raster[0]

    def _s2(self, patch: str) -> np.ndarray:
        rows = []
        for band in band_names("s2", self.layout):
            if band not in BIGEARTHNET_S2_BANDS and band in self.fill:
                rows.append(np.full((self.size, self.size), self.fill[band], dtype=np.float32))
                continue
            if band not in BIGEARTHNET_S2_BANDS:
                raise EvalDataError(
                    f"{self._location(patch)}: BigEarthNet has no band {band}; pass a fill value"
                )
            rows.append(resize_band(self._band(patch, _file_band(band)), self.size))
        return to_reflectance_uint16(np.stack(rows))

    def _s1(self, patch: str) -> np.ndarray:
        bands = [self._band(patch, name) for name in ("VV", "VH")]
        sar = np.stack([resize_band(band.astype(np.float32), self.size) for band in bands])
        check_size(sar, self.size, self._location(f"{patch}/{patch}_VV.tif"))
        return fill_sar_gaps(sar, self._location(patch))[0]

    def __getitem__(self, index: int) -> dict:
        patch = self.patches[index]
        sample: dict = {"key": patch, "labels": self.targets[index]}
        if "s2" in self.modalities:
            sample["s2"] = self._s2(patch)
        if "s1" in self.modalities:
            sample["s1"] = self._s1(patch)
        return sample


def _digest(
    table: bytes | None, class_names: tuple[str, ...], label_map: dict[str, str | None] | None
) -> str:
    """A short hash of what decides the targets, so a changed table invalidates cached ones."""
    content = (table or b"") + json.dumps([class_names, sorted((label_map or {}).items())]).encode()
    return hashlib.sha256(content).hexdigest()[:16]


def _detect_modalities(store: Store, patch: str) -> tuple[str, ...]:
    names = {posixpath.basename(key) for key in store.list(f"{patch}/")}
    found = []
    if f"{patch}_VV.tif" in names:
        found.append("s1")
    if f"{patch}_B02.tif" in names:
        found.append("s2")
    if not found:
        raise EvalDataError(
            f"{store.uri.rstrip('/')}/{patch} has neither Sentinel-2 band files "
            f"({patch}_B02.tif, ...) nor Sentinel-1 files ({patch}_VV.tif, {patch}_VH.tif)"
        )
    return tuple(sorted(found))


def multilabel_splits(
    store: Store,
    *,
    table: bytes | None = None,
    table_source: str = "",
    class_names: Sequence[str] = BIGEARTHNET_19,
    label_map: dict[str, str | None] | None = None,
    modalities: Sequence[str] | None = None,
    layout: str = "sen12ms",
    size: int = 120,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    fill: dict[str, float] | None = None,
) -> LabelledSplits:
    """Patches and multi-hot targets, split by the table's ``split`` column or seeded.

    ``label_map`` renames table labels to ``class_names`` (None drops a label), e.g. to map
    BigEarthNet v1's 43 CORINE classes onto the 19-class nomenclature. A label that is neither
    a class nor mapped is an error naming the patch.
    """
    rows = (
        parse_label_table(table, table_source)
        if table is not None
        else _labels_from_patch_metadata(store)
    )
    source = table_source or store.uri
    class_names = tuple(class_names)
    patches = sorted(rows)
    targets = np.zeros((len(patches), len(class_names)), dtype=np.float32)
    for row, patch in enumerate(patches):
        for label in rows[patch][0]:
            name = label_map.get(label, label) if label_map is not None else label
            if label_map is not None and label in label_map and name is None:
                continue
            if name not in class_names:
                raise EvalDataError(
                    f"{source}: patch {patch} has label {label!r}, which is not in the "
                    f"{len(class_names)}-class nomenclature; pass a class list or label map "
                    "that covers it"
                )
            targets[row, class_names.index(name)] = 1.0
    if modalities is None:
        modalities = _detect_modalities(store, patches[0])
    given = [rows[patch][1] for patch in patches]
    if all(split is not None for split in given):
        indices = {name: [i for i, split in enumerate(given) if split == name] for name in SPLITS}
        split_desc = "table"
    else:
        indices = seeded_split(
            {"all": list(range(len(patches)))}, val_fraction, test_fraction, seed
        )
        split_desc = f"seeded:{val_fraction}:{test_fraction}:{seed}"
    dataset = MultiLabelPatches(store, patches, targets, modalities, layout, size, fill)
    return LabelledSplits(
        task="multilabel",
        class_names=class_names,
        train=Subset(dataset, indices["train"]),
        val=Subset(dataset, indices["val"]),
        test=Subset(dataset, indices["test"]),
        modalities=tuple(modalities),
        identity=f"multilabel|{store.uri}|{source}|{len(patches)}|{layout}|{size}|{split_desc}|"
        f"{_digest(table, class_names, label_map)}",
    )
