"""Writers of small files in the real Sen12MS-CR-TS, Satlas and GeoTIFF layouts, for the tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from rsdino.eval.multilabel import BIGEARTHNET_S2_BANDS

TRAIN_ROI = ("ROIs1868", "36")  # not in the official test or val lists
TEST_ROI = ("ROIs1158", "106")


def geotiff_bytes(array: np.ndarray) -> bytes:
    """A georeferenced GeoTIFF of [C, H, W] `array` in its own dtype."""
    count, height, width = array.shape
    with MemoryFile() as memory_file:
        with memory_file.open(
            driver="GTiff",
            width=width,
            height=height,
            count=count,
            dtype=array.dtype.name,
            crs="EPSG:32632",
            transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0),  # 10 m pixels, UTM 32N
        ) as dataset:
            dataset.write(array)
        return memory_file.read()


def write_geotiff(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(geotiff_bytes(array))


def write_png(path: Path, array: np.ndarray) -> None:
    """[H, W] (grey) or [H, W, 3] (RGB) uint8, or [H, W] uint16, as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def sen12ms_keys(
    roi: tuple[str, str], time: int, patch: int, s1_date: str, s2_date: str
) -> tuple[str, str]:
    """Tree keys of one acquisition pair, named as in SEN12MS-CR-TS."""
    roi_dir, tile = roi
    stem = f"{roi_dir}_{tile}_ImgNo_{time}"
    return (
        f"{roi_dir}/{tile}/S1/{time}/s1_{stem}_{s1_date}_patch_{patch}.tif",
        f"{roi_dir}/{tile}/S2/{time}/s2_{stem}_{s2_date}_patch_{patch}.tif",
    )


def random_s2(rng: np.random.Generator, size: int = 16, bands: int = 13) -> np.ndarray:
    return rng.integers(0, 10000, size=(bands, size, size), dtype=np.uint16)


def random_s1(rng: np.random.Generator, size: int = 16) -> np.ndarray:
    return rng.uniform(-30.0, 0.0, size=(2, size, size)).astype(np.float32)


def write_pairs_file(root: Path, name: str, pairs: list[tuple[str, str]]) -> None:
    (root / name).write_text(json.dumps([list(pair) for pair in pairs]))


def satlas_8bit_groups(size: int, values: dict[str, object]) -> dict[str, np.ndarray]:
    """Constant 8-bit band-group images: `values["tci"]` is an (R, G, B) triple."""
    groups = {}
    for group, value in values.items():
        shape = (size, size, 3) if group == "tci" else (size, size)
        groups[group] = np.broadcast_to(np.asarray(value, dtype=np.uint8), shape).copy()
    return groups


def write_satlas_tile(
    root: Path, split: str, image_dir: str, tile: str, groups: dict[str, np.ndarray]
) -> None:
    for group, pixels in groups.items():
        write_png(root / split / image_dir / group / f"{tile}.png", pixels)


def write_eurosat(root: Path, classes: dict[str, int], size: int = 16) -> None:
    """EuroSAT-MS: <Class>/<Class>_<n>.tif, 13 bands where band b holds 100 * (b + 1) + class."""
    for class_id, (name, count) in enumerate(sorted(classes.items())):
        for n in range(1, count + 1):
            array = np.stack(
                [np.full((size, size), 100 * (b + 1) + class_id, np.uint16) for b in range(13)]
            )
            write_geotiff(root / name / f"{name}_{n}.tif", array)


def write_bigearthnet_patch(root: Path, patch: str, value: int, with_s1: bool = True) -> None:
    """BigEarthNet: one folder per patch, S2 bands at 10/20/60 m sizes, optional S1 VV/VH."""
    sizes = {"B02": 12, "B03": 12, "B04": 12, "B08": 12, "B01": 2, "B09": 2}
    for band in BIGEARTHNET_S2_BANDS:
        name = band if band == "B8A" else f"B{int(band[1:]):02d}"
        size = sizes.get(name, 6)
        write_geotiff(root / patch / f"{patch}_{name}.tif", np.full((1, size, size), value, "u2"))
    if with_s1:
        for pol, db in (("VV", -10.0), ("VH", -17.0)):
            array = np.full((1, 12, 12), db, np.float32)
            write_geotiff(root / patch / f"{patch}_{pol}.tif", array)


def write_seg_tile(root: Path, name: str, mask: np.ndarray, s1: bool = True) -> None:
    """A segmentation tile: images/NAME.tif (13 bands), labels/NAME.tif, optional s1/NAME.tif."""
    size = mask.shape[0]
    write_geotiff(root / "images" / f"{name}.tif", np.full((13, size, size), 500, np.uint16))
    write_geotiff(root / "labels" / f"{name}.tif", mask[None].astype(np.uint8))
    if s1:
        write_geotiff(root / "s1" / f"{name}.tif", np.full((2, size, size), -12.0, np.float32))


SEN12MS_TREE_PAIRS = 6


def sen12ms_tree_arrays(size: int = 32) -> list[tuple[str, np.ndarray, str, np.ndarray]]:
    """(S1 key, S1 dB array, S2 key, S2 uint16 array) of the tree ``write_sen12ms_tree`` writes,
    so tests can compute expected values from the very arrays in the files."""
    rng = np.random.default_rng(0)
    arrays = []
    for index in range(SEN12MS_TREE_PAIRS):
        s1_key, s2_key = sen12ms_keys(TRAIN_ROI, index, 0, "2018-03-01", f"2018-03-{index + 1:02d}")
        arrays.append((s1_key, random_s1(rng, size), s2_key, random_s2(rng, size)))
    return arrays


def write_sen12ms_tree(root: Path, size: int = 32) -> dict[str, bytes]:
    """Six S1/S2 acquisitions in the SEN12MS-CR-TS folder layout; returns key -> file bytes."""
    files = {}
    for s1_key, s1, s2_key, s2 in sen12ms_tree_arrays(size):
        for key, array in ((s1_key, s1), (s2_key, s2)):
            write_geotiff(root / key, array)
            files[key] = (root / key).read_bytes()
    return files


SERIES_DATES = ("2018-01-05", "2018-02-10", "2018-04-01", "2018-06-15", "2018-09-01", "2018-12-20")


def write_sen12ms_time_series(
    root: Path, dates: tuple[str, ...] = SERIES_DATES, patches: int = 2, size: int = 32
) -> dict[str, bytes]:
    """Every patch of one training ROI at each date (time index = position in ``dates``), in the
    SEN12MS-CR-TS tree layout; S2 band 0 holds the time index, so a test can tell dates apart."""
    rng = np.random.default_rng(1)
    files = {}
    for patch in range(patches):
        for time, date in enumerate(dates):
            s1_key, s2_key = sen12ms_keys(TRAIN_ROI, time, patch, date, date)
            s2 = random_s2(rng, size)
            s2[0] = time
            for key, array in ((s1_key, random_s1(rng, size)), (s2_key, s2)):
                write_geotiff(root / key, array)
                files[key] = (root / key).read_bytes()
    return files
