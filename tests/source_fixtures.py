"""Writers of small files in the real Sen12MS-CR-TS, Satlas and GeoTIFF layouts, for the tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from rasterio.io import MemoryFile
from rasterio.transform import Affine

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
