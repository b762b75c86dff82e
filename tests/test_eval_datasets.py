"""Labelled evaluation readers on small files written here in the real dataset layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from s3_server import put_objects
from source_fixtures import write_bigearthnet_patch, write_eurosat, write_geotiff, write_seg_tile

from rsdino.data.sources.decode import DataError
from rsdino.data.storage import open_store
from rsdino.eval.datasets import EvalDataError, scene_splits
from rsdino.eval.multilabel import BIGEARTHNET_19, multilabel_splits
from rsdino.eval.segtiles import segmentation_splits
from rsdino.eval.synthetic import synthetic_splits

pytest_plugins = ["s3_server"]


def test_eurosat_reorders_bands_and_splits_by_class(tmp_path: Path) -> None:
    write_eurosat(tmp_path, {"Forest": 10, "River": 10})
    splits = scene_splits(open_store(str(tmp_path)), size=16, val_fraction=0.2, test_fraction=0.3)
    assert splits.class_names == ("Forest", "River")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 4, 6)
    test_labels = sorted(splits.test[i]["label"] for i in range(len(splits.test)))
    assert test_labels == [0, 0, 0, 1, 1, 1]  # stratified
    sample = splits.train[0]
    assert sample["s2"].dtype == np.uint16 and sample["s2"].shape == (13, 16, 16)
    # The model's sen12ms layout has B8A after B8; EuroSAT stores it last (file band 13).
    assert sample["s2"][8, 0, 0] == 1300 + sample["label"]
    assert sample["s2"][9, 0, 0] == 900 + sample["label"]  # B9
    keys = {splits.split(s)[i]["key"] for s in ("train", "val", "test") for i in range(4)}
    assert len(keys) == 12  # no sample in two splits
    again = scene_splits(open_store(str(tmp_path)), size=16, val_fraction=0.2, test_fraction=0.3)
    assert again.test[0]["key"] == splits.test[0]["key"]


def test_eurosat_split_lists_and_satlas_layout(tmp_path: Path) -> None:
    write_eurosat(tmp_path, {"Forest": 3, "River": 3})
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("Forest_1.jpg\nRiver_1.jpg\nForest_2.jpg\n")
    (tmp_path / "splits" / "val.txt").write_text("River_2.jpg\n")
    (tmp_path / "splits" / "test.txt").write_text("Forest_3.jpg\nRiver_3.jpg\n")
    splits = scene_splits(open_store(str(tmp_path)), size=16, split_dir="splits", layout="satlas")
    assert [len(splits.split(s)) for s in ("train", "val", "test")] == [3, 1, 2]
    assert splits.val[0]["key"] == "River/River_2.tif"
    assert splits.val[0]["s2"][:, 0, 0].tolist() == [401, 301, 201, 501, 601, 701, 801, 1101, 1201]
    (tmp_path / "splits" / "test.txt").write_text("Lake_1.tif\n")
    with pytest.raises(EvalDataError, match=r"test.txt .* 'Lake_1'"):
        scene_splits(open_store(str(tmp_path)), size=16, split_dir="splits")


def test_eurosat_bad_files_name_the_file(tmp_path: Path) -> None:
    write_eurosat(tmp_path, {"Forest": 2}, size=16)
    splits = scene_splits(open_store(str(tmp_path)), size=64, test_fraction=0.5, val_fraction=0)
    with pytest.raises(DataError, match=r"Forest_.*16x16 pixels, expected 64x64"):
        splits.train[0]
    write_geotiff(tmp_path / "Forest" / "Forest_9.tif", np.zeros((12, 16, 16), np.uint16))
    folder = scene_splits(open_store(str(tmp_path)), size=16, test_fraction=0, val_fraction=0)
    bad = next(i for i in range(3) if folder.train.source.keys[i].endswith("_9.tif"))
    with pytest.raises(DataError, match=r"Forest_9.tif: has 12 bands, expected 13"):
        folder.train.source[bad]
    write_geotiff(tmp_path / "Forest" / "River_1.tif", np.zeros((13, 16, 16), np.uint16))
    with pytest.raises(EvalDataError, match=r"River_1.tif: file name does not start"):
        scene_splits(open_store(str(tmp_path)))


def test_eurosat_reads_from_s3(
    tmp_path: Path, bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_eurosat(tmp_path, {"Forest": 2, "River": 2})
    objects = {
        f"eurosat/{path.relative_to(tmp_path).as_posix()}": path.read_bytes()
        for path in tmp_path.rglob("*.tif")
    }
    put_objects(s3_env, bucket, objects)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    splits = scene_splits(
        open_store(f"s3://{bucket}/eurosat"), size=16, val_fraction=0, test_fraction=0.5
    )
    assert len(splits.train) == 2 and splits.test[0]["s2"].shape == (13, 16, 16)


def test_bigearthnet_table_labels_bands_and_s1(tmp_path: Path) -> None:
    rows = ["patch_id,labels,split"]
    for i, split in enumerate(["train", "train", "validation", "test"]):
        write_bigearthnet_patch(tmp_path, f"P{i}", 1000 + i)
        rows.append(f'P{i},"Arable land;Marine waters",{split}')
    table = ("\n".join(rows) + "\n").encode()
    splits = multilabel_splits(
        open_store(str(tmp_path)), table=table, table_source="meta.csv", size=12, fill={"B10": 7}
    )
    assert splits.task == "multilabel" and splits.modalities == ("s1", "s2")
    assert [len(splits.split(s)) for s in ("train", "val", "test")] == [2, 1, 1]
    sample = splits.val[0]
    assert sample["key"] == "P2"
    assert np.flatnonzero(sample["labels"]).tolist() == [2, 18]
    assert sample["s2"].shape == (13, 12, 12) and sample["s2"].dtype == np.uint16
    assert sample["s2"][10].max() == 7 and sample["s2"][0].min() == 1002  # B10 filled, B1 resized
    assert sample["s1"].shape == (2, 12, 12) and sample["s1"][1, 0, 0] == pytest.approx(-17.0)


def test_bigearthnet_errors_and_label_map(tmp_path: Path) -> None:
    write_bigearthnet_patch(tmp_path, "P0", 5, with_s1=False)
    store = open_store(str(tmp_path))
    table = json.dumps({"P0": ["Sea and ocean"]}).encode()
    with pytest.raises(EvalDataError, match=r"meta.json: patch P0 has label 'Sea and ocean'"):
        multilabel_splits(store, table=table, table_source="meta.json")
    mapped = multilabel_splits(
        store,
        table=table,
        table_source="meta.json",
        label_map={"Sea and ocean": "Marine waters"},
        val_fraction=0,
        test_fraction=0,
        size=12,
    )
    assert mapped.modalities == ("s2",) and mapped.train.source.targets[0, 18] == 1.0
    with pytest.raises(EvalDataError, match=r"has no band B10"):
        mapped.train[0]["s2"]
    (tmp_path / "P0" / "P0_B05.tif").unlink()
    filled = multilabel_splits(
        store,
        table=table,
        table_source="m.json",
        label_map={"Sea and ocean": None},
        val_fraction=0,
        test_fraction=0,
        size=12,
        fill={"B10": 0.0},
    )
    assert filled.train.source.targets.sum() == 0
    with pytest.raises(DataError, match=r"P0/P0_B05.tif: is missing"):
        filled.train[0]
    assert len(BIGEARTHNET_19) == 19


def test_segmentation_tiles_masks_and_errors(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 2
    mask[0, 0] = 255
    for i in range(5):
        write_seg_tile(tmp_path, f"t{i}", mask)
    splits = segmentation_splits(
        open_store(str(tmp_path)), num_classes=3, size=8, val_fraction=0.2, test_fraction=0.2
    )
    assert splits.modalities == ("s1", "s2") and splits.ignore_index == 255
    sample = splits.train[0]
    assert sample["mask"].dtype == np.int64 and sample["mask"][0, 0] == 255
    assert sample["s1"].shape == (2, 8, 8) and sample["s2"].shape == (13, 8, 8)
    bad = mask.copy()
    bad[1, 1] = 7
    write_seg_tile(tmp_path, "t0", bad)
    tiles = segmentation_splits(
        open_store(str(tmp_path)), num_classes=3, val_fraction=0, test_fraction=0
    )
    with pytest.raises(DataError, match=r"labels/t0.tif: has label values \[7\] outside 0..2"):
        tiles.train[0]
    write_geotiff(tmp_path / "labels" / "t1.tif", np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"labels/t1.tif: image vs label raster"):
        tiles.train[1]


def test_synthetic_splits_give_every_task() -> None:
    kwargs = {"counts": (3, 2, 2), "tile_size": 16, "num_classes": 4, "index_offset": 100}
    scene = synthetic_splits("scene", **kwargs)
    multi = synthetic_splits("multilabel", **kwargs)
    seg = synthetic_splits("segmentation", **kwargs)
    assert scene.test[0]["key"] == multi.test[0]["key"] == "synthetic/seed0/000105"
    label, present, mask = scene.train[1]["label"], multi.train[1]["labels"], seg.train[1]["mask"]
    assert mask.shape == (16, 16) and present[label] == 1.0
    assert np.bincount(mask.ravel(), minlength=4).argmax() == label
    assert set(np.flatnonzero(present)) <= set(np.unique(mask))
    with pytest.raises(EvalDataError, match=r"unknown synthetic task"):
        synthetic_splits("detection")
