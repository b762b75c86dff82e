"""Real-data sources on small files written in the real layouts, including bad data."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import saved_tensors, tiny_config
from source_fixtures import (
    TEST_ROI,
    TRAIN_ROI,
    geotiff_bytes,
    random_s1,
    random_s2,
    satlas_8bit_groups,
    sen12ms_keys,
    write_geotiff,
    write_pairs_file,
    write_png,
    write_satlas_tile,
)

from rsdino.data.bands import S2_BANDS_SATLAS
from rsdino.data.build import SourceSpec, open_source
from rsdino.data.collate import collate_samples
from rsdino.data.sources import (
    BandCountError,
    CorruptFileError,
    DataError,
    GeoTiffFolderSource,
    MissingPartnerError,
    NanTileError,
    SatlasSource,
    Sen12MSSource,
    ShapeMismatchError,
    SkipBadSamples,
    SkipSample,
    parse_dataset_string,
    store_access,
)
from rsdino.data.sources.decode import day_of_year_in_name, fill_sar_gaps
from rsdino.data.storage import LocalStore
from rsdino.errors import RsdinoError
from rsdino.train.loop import train

LOGGER = "rsdino.data.sources.decode"


def local_access(root: Path):
    return store_access(LocalStore(root))


def write_pair(root: Path, rng, roi, time, patch, s1_date="2018-01-03", s2_date="2018-01-02"):
    """One S1/S2 acquisition in the tree layout; returns (s1_key, s2_key, s1, s2)."""
    s1_key, s2_key = sen12ms_keys(roi, time, patch, s1_date, s2_date)
    s1, s2 = random_s1(rng), random_s2(rng)
    write_geotiff(root / s1_key, s1)
    write_geotiff(root / s2_key, s2)
    return s1_key, s2_key, s1, s2


# --- Sen12MS-CR-TS -----------------------------------------------------------------------------


def test_tree_layout_pairs_sensors_and_keeps_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    written = {}
    for time, patch, s2_date in [(0, 0, "2018-01-02"), (0, 1, "2018-01-02"), (1, 0, "2018-03-01")]:
        _, s2_key, s1, s2 = write_pair(tmp_path, rng, TRAIN_ROI, time, patch, s2_date=s2_date)
        written[s2_key] = (s1, s2, s2_date)
    write_pair(tmp_path, rng, TEST_ROI, 0, 0)  # official test ROI: not in "train"
    (tmp_path / TRAIN_ROI[0] / TRAIN_ROI[1] / "S2" / "0" / "notes.txt").write_text("ignored")

    source = Sen12MSSource(*local_access(tmp_path), split="train")

    assert len(source) == 3
    assert sorted(source.keys) == sorted(written)
    expected_doy = {"2018-01-02": 2, "2018-03-01": 60}
    for index, key in enumerate(source.keys):
        sample = source[index]
        s1, s2, s2_date = written[key]
        assert sample["key"] == key
        assert sample["s2"].dtype == np.uint16 and sample["s2"].shape == (13, 16, 16)
        assert sample["s1"].dtype == np.float32 and sample["s1"].shape == (2, 16, 16)
        np.testing.assert_array_equal(sample["s2"], s2)
        np.testing.assert_array_equal(sample["s1"], s1)
        assert sample["doy"] == expected_doy[s2_date]
        assert sample["label"] == -1
    assert source.error_counts == {}


def test_tree_layout_splits_follow_official_rois(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    write_pair(tmp_path, rng, TRAIN_ROI, 0, 0)
    write_pair(tmp_path, rng, TEST_ROI, 0, 0)
    write_pair(tmp_path, rng, ("ROIs2017", "22"), 0, 0)  # official validation ROI
    access = local_access(tmp_path)
    counts = {split: len(Sen12MSSource(*access, split=split)) for split in ("train", "val", "test")}
    assert counts == {"train": 1, "val": 1, "test": 1}
    assert len(Sen12MSSource(*access, split="all")) == 3
    with pytest.raises(ValueError, match="split"):
        Sen12MSSource(*access, split="TRAIN")


def test_tree_doy_falls_back_to_sentinel1_date(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    s1_key, _ = sen12ms_keys(TRAIN_ROI, 0, 0, "2018-02-01", "unused")
    write_geotiff(tmp_path / s1_key, random_s1(rng))
    write_geotiff(tmp_path / "ROIs1868/36/S2/0/s2_ROIs1868_36_ImgNo_0_patch_0.tif", random_s2(rng))
    assert Sen12MSSource(*local_access(tmp_path))[0]["doy"] == 32


def test_unimodal_tree_needs_no_sentinel1(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    _, s2_key = sen12ms_keys(TRAIN_ROI, 0, 0, "2018-01-03", "2018-01-02")
    s2 = random_s2(rng)
    write_geotiff(tmp_path / s2_key, s2)
    source = Sen12MSSource(*local_access(tmp_path), multimodal=False, on_error="fail")
    sample = source[0]
    assert "s1" not in sample
    np.testing.assert_array_equal(sample["s2"], s2)


def test_pair_list_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    pairs, arrays = [], []
    for name, date in [("b", "2019-12-31"), ("a", "2020-01-05")]:
        s1, s2 = random_s1(rng), random_s2(rng)
        s1_key, s2_key = f"flat/{name}_s1_{date}.tif", f"flat/{name}_s2_{date}.tif"
        write_geotiff(tmp_path / s1_key, s1)
        write_geotiff(tmp_path / s2_key, s2)
        pairs.append((s1_key, s2_key))
        arrays.append((s1, s2))
    write_pairs_file(tmp_path, "val_all.json", pairs)

    source = Sen12MSSource(*local_access(tmp_path), split="val", layout="pairs")

    assert source.keys == [s2_key for _, s2_key in pairs]  # the list's order
    for index, (s1, s2) in enumerate(arrays):
        np.testing.assert_array_equal(source[index]["s1"], s1)
        np.testing.assert_array_equal(source[index]["s2"], s2)
    assert [source[i]["doy"] for i in range(2)] == [365, 5]
    copy = pickle.loads(pickle.dumps(source))  # as DataLoader workers receive it
    np.testing.assert_array_equal(copy[1]["s2"], arrays[1][1])
    batch = collate_samples([source[0], source[1]])
    assert batch["s2"].dtype == torch.uint16 and tuple(batch["s2"].shape) == (2, 13, 16, 16)
    assert batch["s1"].dtype == torch.float32 and batch["doy"].tolist() == [365, 5]


def test_pair_list_named_explicitly_and_malformed(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    write_geotiff(tmp_path / "x_s2.tif", random_s2(rng))
    write_pairs_file(tmp_path, "mine.json", [("absent_s1.tif", "x_s2.tif")])
    access = local_access(tmp_path)
    source = Sen12MSSource(*access, layout="pairs", pairs_file="mine.json", multimodal=False)
    assert source.keys == ["x_s2.tif"]
    (tmp_path / "bad.json").write_text('[["only_one.tif"]]')
    with pytest.raises(ValueError, match=r"bad\.json"):
        Sen12MSSource(*access, layout="pairs", pairs_file="bad.json")


# --- bad data in Sen12MS ---------------------------------------------------------------------


def corrupt_s2(root: Path, rng) -> str:
    _, s2_key, _, _ = write_pair(root, rng, TRAIN_ROI, 5, 0)
    (root / s2_key).write_bytes(geotiff_bytes(random_s2(rng))[:300])
    return s2_key


def twelve_band_s2(root: Path, rng) -> str:
    _, s2_key, _, _ = write_pair(root, rng, TRAIN_ROI, 5, 0)
    write_geotiff(root / s2_key, random_s2(rng, bands=12))
    return s2_key


def mostly_nan_s1(root: Path, rng) -> str:
    s1_key, _, s1, _ = write_pair(root, rng, TRAIN_ROI, 5, 0)
    s1[1, :10] = np.nan  # 10 of 16 rows of VH: 62.5 % > 50 %
    write_geotiff(root / s1_key, s1)
    return s1_key


def all_nan_s1(root: Path, rng) -> str:
    s1_key, _, _, _ = write_pair(root, rng, TRAIN_ROI, 5, 0)
    write_geotiff(root / s1_key, np.full((2, 16, 16), np.nan, dtype=np.float32))
    return s1_key


def larger_s1(root: Path, rng) -> str:
    s1_key, _, _, _ = write_pair(root, rng, TRAIN_ROI, 5, 0)
    write_geotiff(root / s1_key, random_s1(rng, size=32))
    return s1_key


READ_TIME_CASES = [
    (corrupt_s2, CorruptFileError, "corrupt"),
    (twelve_band_s2, BandCountError, "band_count"),
    (mostly_nan_s1, NanTileError, "nan"),
    (all_nan_s1, NanTileError, "nan"),
    (larger_s1, ShapeMismatchError, "shape"),
]


def dataset_with_one_bad_sample(root: Path, make_bad) -> tuple[list[str], str]:
    """Two good acquisitions (times 0, 1) and one bad (time 5); returns the good S2 keys."""
    rng = np.random.default_rng(6)
    good = [write_pair(root, rng, TRAIN_ROI, time, 0)[1] for time in (0, 1)]
    return good, make_bad(root, rng)


@pytest.mark.parametrize(("make_bad", "error_type", "kind"), READ_TIME_CASES)
def test_bad_sample_is_skipped_counted_and_logged_once(
    tmp_path: Path, caplog, make_bad, error_type, kind
) -> None:
    good, bad_key = dataset_with_one_bad_sample(tmp_path, make_bad)
    source = Sen12MSSource(*local_access(tmp_path))
    assert len(source) == 3
    bad_index = len(source) - 1  # time 5 sorts last

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            with pytest.raises(SkipSample) as skipped:
                source[bad_index]
            assert (skipped.value.kind, skipped.value.key) == (kind, bad_key)
    assert source.error_counts == {kind: 1}
    assert sum(bad_key in record.getMessage() for record in caplog.records) == 1
    assert [source[i]["key"] for i in range(bad_index)] == good

    # The wrapper serves the next good sample (wrapping around) in place of the bad one.
    wrapped = SkipBadSamples(source)
    assert wrapped[bad_index]["key"] == good[0]
    assert [wrapped[i]["key"] for i in range(bad_index)] == good


@pytest.mark.parametrize(("make_bad", "error_type", "kind"), READ_TIME_CASES)
def test_bad_sample_fails_with_its_key(tmp_path: Path, make_bad, error_type, kind) -> None:
    _, bad_key = dataset_with_one_bad_sample(tmp_path, make_bad)
    source = Sen12MSSource(*local_access(tmp_path), on_error="fail")
    with pytest.raises(error_type, match=re.escape(bad_key)) as failure:
        source[len(source) - 1]
    assert failure.value.kind == kind and failure.value.key == bad_key
    assert isinstance(failure.value, DataError) and isinstance(failure.value, RsdinoError)


def test_missing_partner_is_dropped_at_index_time_or_fails(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(7)
    good = write_pair(tmp_path, rng, TRAIN_ROI, 0, 0)[1]
    orphan_s1, orphan_s2, _, _ = write_pair(tmp_path, rng, TRAIN_ROI, 1, 0)
    (tmp_path / orphan_s1).unlink()
    access = local_access(tmp_path)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        source = Sen12MSSource(*access)
    assert source.keys == [good]
    assert source.error_counts == {"missing_partner": 1}
    assert sum(orphan_s2 in record.getMessage() for record in caplog.records) == 1

    with pytest.raises(MissingPartnerError, match=re.escape(orphan_s2)):
        Sen12MSSource(*access, on_error="fail")


def test_missing_file_of_pair_list_counts_as_missing_partner(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    write_geotiff(tmp_path / "a_s1.tif", random_s1(rng))
    write_geotiff(tmp_path / "a_s2.tif", random_s2(rng))
    write_geotiff(tmp_path / "b_s2.tif", random_s2(rng))
    write_pairs_file(
        tmp_path, "train_all.json", [("a_s1.tif", "a_s2.tif"), ("b_s1.tif", "b_s2.tif")]
    )
    source = Sen12MSSource(*local_access(tmp_path), layout="pairs")
    assert source.keys == ["a_s2.tif"]
    assert source.error_counts == {"missing_partner": 1}


def test_few_sar_nans_are_filled_with_band_minimum(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    s1_key, _, s1, _ = write_pair(tmp_path, rng, TRAIN_ROI, 0, 0)
    s1[0, 3, 4] = np.nan
    s1[1, 0, 0] = np.nan
    s1[1, 7, 7] = np.nan
    write_geotiff(tmp_path / s1_key, s1)

    source = Sen12MSSource(*local_access(tmp_path), on_error="fail")
    filled = source[0]["s1"]

    assert filled[0, 3, 4] == np.nanmin(s1[0])
    assert filled[1, 0, 0] == filled[1, 7, 7] == np.nanmin(s1[1])
    finite = np.isfinite(s1)
    np.testing.assert_array_equal(filled[finite], s1[finite])
    assert source.error_counts == {"nan_filled": 1}


def test_fill_sar_gaps_by_hand() -> None:
    sar = np.array([[[-10.0, np.nan], [-12.0, -11.0]], [[-20.0, -21.0], [-np.inf, -19.0]]])
    filled, count = fill_sar_gaps(sar, "k")
    np.testing.assert_array_equal(
        filled, [[[-10.0, -12.0], [-12.0, -11.0]], [[-20.0, -21.0], [-21.0, -19.0]]]
    )
    assert count == 2 and filled.dtype == np.float32
    half_missing = np.array([[[np.nan, np.nan], [-1.0, -2.0]], [[-3.0, -4.0], [-5.0, -6.0]]])
    assert fill_sar_gaps(half_missing, "k")[1] == 2  # exactly 50 % is still filled
    with pytest.raises(NanTileError, match="75%"):
        fill_sar_gaps(np.where(np.arange(8).reshape(2, 2, 2) < 3, np.nan, -1.0), "k")


@pytest.mark.parametrize(
    ("name", "doy"),
    [
        ("s2_ROIs1158_106_ImgNo_0_2018-01-03_patch_0.tif", 3),
        ("S2A_MSIL1C_20201231T102041_N0400_R065_T32TNS_20210101T140735", 366),
        ("scene_20181340_2019-03-01.tif", 60),
        ("s2_ROIs1158_106_ImgNo_0_patch_0.tif", 0),
        ("tile_20181340.tif", 0),
    ],
)
def test_day_of_year_in_name(name: str, doy: int) -> None:
    assert day_of_year_in_name(name) == doy


# --- Satlas ----------------------------------------------------------------------------------

SATLAS_IMAGE = "S2A_MSIL1C_20220614T102041_N0400_R065_T32TNS_20220614T140735"
SATLAS_8BIT = {
    "tci": (10, 20, 30),
    "b05": 40,
    "b06": 50,
    "b07": 60,
    "b08": 70,
    "b11": 80,
    "b12": 90,
}
# TCI: v * 3558 / 255 rounded (10 -> 139.5, 20 -> 279.1, 30 -> 418.6); other bands: v * 32.
SATLAS_EXPECTED = {
    "B4": 140,
    "B3": 279,
    "B2": 419,
    "B5": 1280,
    "B6": 1600,
    "B7": 1920,
    "B8": 2240,
    "B11": 2560,
    "B12": 2880,
}


def test_satlas_channels_in_layout_order_and_doy(tmp_path: Path) -> None:
    write_satlas_tile(
        tmp_path, "train", SATLAS_IMAGE, "1234_5678", satlas_8bit_groups(16, SATLAS_8BIT)
    )
    groups = satlas_8bit_groups(16, SATLAS_8BIT)
    groups["b08"] = np.full((16, 16), 3210, dtype=np.uint16)  # 16-bit: taken as is
    write_satlas_tile(tmp_path, "train", "undated_image", "7_9", groups)
    write_satlas_tile(tmp_path, "val", SATLAS_IMAGE, "1_1", satlas_8bit_groups(16, SATLAS_8BIT))

    source = SatlasSource(*local_access(tmp_path), split="train", on_error="fail")

    assert source.keys == [f"train/{SATLAS_IMAGE}/1234_5678", "train/undated_image/7_9"]
    dated, undated = source[0], source[1]
    assert dated["s2"].dtype == np.uint16 and dated["s2"].shape == (9, 16, 16)
    for channel, band in enumerate(S2_BANDS_SATLAS):
        assert np.all(dated["s2"][channel] == SATLAS_EXPECTED[band]), band
    assert dated["doy"] == 165  # 14 June 2022
    assert undated["doy"] == 0
    assert np.all(undated["s2"][S2_BANDS_SATLAS.index("B8")] == 3210)
    assert "s1" not in dated and dated["label"] == -1


def test_satlas_incomplete_tile_and_bad_pngs(tmp_path: Path) -> None:
    groups = satlas_8bit_groups(16, SATLAS_8BIT)
    write_satlas_tile(tmp_path, "train", "img_a", "0_0", groups)
    incomplete = {group: pixels for group, pixels in groups.items() if group != "b07"}
    write_satlas_tile(tmp_path, "train", "img_a", "0_1", incomplete)
    write_satlas_tile(tmp_path, "train", "img_b", "0_0", groups)
    write_png(tmp_path / "train/img_b/b11/0_0.png", np.zeros((16, 16, 3), dtype=np.uint8))
    write_satlas_tile(tmp_path, "train", "img_c", "0_0", groups)
    write_png(tmp_path / "train/img_c/b12/0_0.png", np.zeros((32, 32), dtype=np.uint8))
    write_satlas_tile(tmp_path, "train", "img_d", "0_0", groups)
    tci = tmp_path / "train/img_d/tci/0_0.png"
    tci.write_bytes(tci.read_bytes()[:40])
    access = local_access(tmp_path)

    source = SatlasSource(*access)
    assert source.keys == [
        "train/img_a/0_0",
        "train/img_b/0_0",
        "train/img_c/0_0",
        "train/img_d/0_0",
    ]
    kinds = []
    for index in (1, 2, 3):
        with pytest.raises(SkipSample) as skipped:
            source[index]
        kinds.append(skipped.value.kind)
    assert kinds == ["band_count", "shape", "corrupt"]
    assert source.error_counts == {"missing_partner": 1, "band_count": 1, "shape": 1, "corrupt": 1}
    assert SkipBadSamples(source)[3]["key"] == "train/img_a/0_0"

    with pytest.raises(MissingPartnerError, match="b07"):
        SatlasSource(*access, on_error="fail")


# --- GeoTIFF folder --------------------------------------------------------------------------


def test_geotiff_folder_selects_bands(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    first = rng.integers(0, 5000, size=(5, 16, 16), dtype=np.uint16)
    second = rng.integers(0, 5000, size=(5, 16, 16), dtype=np.uint16)
    write_geotiff(tmp_path / "b/scene_20200301.tiff", second)
    write_geotiff(tmp_path / "a/scene.tif", first)
    (tmp_path / "a/readme.md").write_text("not a raster")

    source = GeoTiffFolderSource(*local_access(tmp_path), bands=[3, 1], on_error="fail")

    assert source.keys == ["a/scene.tif", "b/scene_20200301.tiff"]
    np.testing.assert_array_equal(source[0]["s2"], first[[2, 0]])
    np.testing.assert_array_equal(source[1]["s2"], second[[2, 0]])
    assert [source[0]["doy"], source[1]["doy"]] == [0, 61]

    all_bands = GeoTiffFolderSource(*local_access(tmp_path))
    np.testing.assert_array_equal(all_bands[0]["s2"], first)
    with pytest.raises(BandCountError, match=r"a/scene\.tif"):
        GeoTiffFolderSource(*local_access(tmp_path), bands=[6], on_error="fail")[0]
    with pytest.raises(ValueError, match="1-based"):
        GeoTiffFolderSource(*local_access(tmp_path), bands=[0])


def test_geotiff_folder_as_sentinel1(tmp_path: Path) -> None:
    sar = np.stack([np.full((16, 16), -8.0), np.full((16, 16), -15.0), np.zeros((16, 16))])
    write_geotiff(tmp_path / "sar.tif", sar.astype(np.float64))
    access = local_access(tmp_path)
    sample = GeoTiffFolderSource(*access, bands=[1, 2], modality="s1", on_error="fail")[0]
    assert sample["s1"].dtype == np.float32 and "s2" not in sample
    np.testing.assert_array_equal(sample["s1"], sar[:2])
    with pytest.raises(BandCountError, match="expected 2"):
        GeoTiffFolderSource(*access, modality="s1", on_error="fail")[0]


# --- wrapper, dataset strings -------------------------------------------------------


def test_skip_wrapper_when_everything_is_bad(tmp_path: Path) -> None:
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    wrapped = SkipBadSamples(GeoTiffFolderSource(*local_access(tmp_path)))
    with pytest.raises(RsdinoError, match="all 1 samples"):
        wrapped[0]
    with pytest.raises(IndexError):
        wrapped[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Multimodality:split=TRAIN:root=/data/sen12ms",
            {"source": "sen12ms", "split": "train", "uri": "/data/sen12ms"},
        ),
        (
            "Sentinel2:root=s3://bucket/satlas:split=VAL",
            {"source": "satlas", "split": "val", "uri": "s3://bucket/satlas"},
        ),
    ],
)
def test_parse_dataset_string(text: str, expected: dict) -> None:
    assert parse_dataset_string(text) == expected


def test_parse_dataset_string_errors() -> None:
    with pytest.raises(ValueError, match=r"ImageNet.*\['Multimodality', 'Sentinel2'\]"):
        parse_dataset_string("ImageNet:split=TRAIN:root=/x")
    for bad in [
        "Multimodality:split=TRAIN:oops",
        "Multimodality:split=TRAIN:root=/x:color=red",
        "Multimodality:split=TRAIN:split=VAL:root=/x",
        "Multimodality:root=/x",
        "Multimodality",
    ]:
        with pytest.raises(ValueError, match=re.escape(bad)):
            parse_dataset_string(bad)


def test_geotiff_folder_with_another_band_count_names_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    write_geotiff(tmp_path / "a.tif", random_s2(rng))
    write_geotiff(tmp_path / "b.tif", random_s2(rng, bands=4))
    spec = SourceSpec(source="geotiff", uri=str(tmp_path), on_error="fail")
    source = open_source(spec)
    assert source[0]["s2"].shape == (13, 16, 16)
    with pytest.raises(BandCountError, match=r"b\.tif: has 4 bands, expected 13"):
        source[1]
    skipping = open_source(SourceSpec(source="geotiff", uri=str(tmp_path)))
    with pytest.raises(SkipSample):
        skipping[1]
    assert skipping.error_counts == {"band_count": 1}
    # The satlas layout expects 9 bands; picked bands need only be present.
    satlas = open_source(SourceSpec(source="geotiff", uri=str(tmp_path), s2_layout="satlas"))
    with pytest.raises(SkipSample):
        satlas[0]
    picked = open_source(SourceSpec(source="geotiff", uri=str(tmp_path), bands=[2, 3, 4]))
    assert [picked[index]["s2"].shape for index in (0, 1)] == [(3, 16, 16)] * 2


def test_training_on_picked_geotiff_bands(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    for index in range(8):
        write_geotiff(tmp_path / "tiles" / f"tile_{index}.tif", random_s2(rng, size=32))
    cfg = tiny_config(
        "train.dataset.source=geotiff",
        f"train.dataset.uri={tmp_path / 'tiles'}",
        "train.dataset.bands=[2,3,4]",
        "student.in_chans=3",
    )
    result = train(cfg, tmp_path / "run")
    assert result.final_step == 6
    patch_embed = saved_tensors(tmp_path / "run" / "checkpoints", 6, "model.teacher.")
    kernels = [tensor for name, tensor in patch_embed.items() if "patch_embed.proj.weight" in name]
    assert kernels and all(kernel.shape[1] == 3 for kernel in kernels)
