"""Synthetic land-cover source, band statistics/normaliser and sample collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsdino.config.loader import load_config
from rsdino.data.bands import (
    S1_BANDS,
    S2_BANDS_SATLAS,
    S2_BANDS_SEN12MS,
    BandNormalizer,
    band_stats,
)
from rsdino.data.build import build_dataset
from rsdino.data.collate import collate_samples
from rsdino.data.synthetic import SyntheticLandCover

TILE = 32


@pytest.fixture(scope="module")
def dataset() -> SyntheticLandCover:
    return SyntheticLandCover(num_samples=300, tile_size=TILE, seed=3)


@pytest.fixture(scope="module")
def samples(dataset: SyntheticLandCover) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def test_layouts_and_stats_have_matching_lengths() -> None:
    assert len(S2_BANDS_SEN12MS) == 13 and len(S2_BANDS_SATLAS) == 9 and S1_BANDS == ("VV", "VH")
    mean13, std13 = band_stats("s2", "sen12ms")
    mean9, std9 = band_stats("s2", "satlas")
    # Satlas B4, B3, B2, B5, B6, B7, B8, B11, B12 = Sen12MS positions 3, 2, 1, 4, 5, 6, 7, 11, 12.
    satlas_positions = [3, 2, 1, 4, 5, 6, 7, 11, 12]
    assert mean9 == [mean13[i] for i in satlas_positions]
    assert std9 == [std13[i] for i in satlas_positions]
    assert len(band_stats("s1", "sen12ms")[0]) == 2
    with pytest.raises(ValueError, match="modality"):
        band_stats("s3", "sen12ms")
    with pytest.raises(ValueError, match="layout"):
        band_stats("s2", "landsat")


def test_band_normalizer_hand_made_case_and_uint16() -> None:
    normalizer = BandNormalizer(mean=[10.0, 20.0], std=[2.0, 4.0])
    x = torch.tensor([12, 28, 10, 0], dtype=torch.uint16).view(2, 2, 1, 1)
    out = normalizer(x)
    assert out.dtype == torch.float32
    # Sample 0: (12-10)/2 = 1, (28-20)/4 = 2; sample 1: (10-10)/2 = 0, (0-20)/4 = -5.
    assert out.flatten().tolist() == [1.0, 2.0, 0.0, -5.0]


def test_band_normalizer_rejects_wrong_band_count() -> None:
    normalizer = BandNormalizer(mean=[0.0, 0.0], std=[1.0, 1.0])
    with pytest.raises(ValueError, match="expected 2 bands, got 3"):
        normalizer(torch.zeros(1, 3, 4, 4))


def test_same_index_gives_same_bytes_across_instances(samples: list[dict]) -> None:
    other = SyntheticLandCover(num_samples=300, tile_size=TILE, seed=3)
    for index in (0, 17, 299):
        a, b = samples[index], other[index]
        assert a.keys() == b.keys()
        for key in ("s1", "s2", "landcover"):
            assert a[key].tobytes() == b[key].tobytes()
        assert (a["doy"], a["key"], a["label"]) == (b["doy"], b["key"], b["label"])
    assert samples[0]["s2"].tobytes() != samples[1]["s2"].tobytes()
    assert SyntheticLandCover(5, tile_size=TILE, seed=4)[0]["s2"].tobytes() != (
        samples[0]["s2"].tobytes()
    )


def test_index_offset_reads_other_tiles_of_the_same_world(samples: list[dict]) -> None:
    held_out = SyntheticLandCover(num_samples=10, tile_size=TILE, seed=3, index_offset=290)
    assert held_out[4]["s2"].tobytes() == samples[294]["s2"].tobytes()
    assert held_out[4]["key"] == "synthetic/seed3/000294"


def test_out_of_range_index_raises(dataset: SyntheticLandCover) -> None:
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.raises(IndexError):
        dataset[-1]


@pytest.mark.parametrize(("layout", "bands"), [("sen12ms", 13), ("satlas", 9)])
def test_shapes_and_dtypes(layout: str, bands: int) -> None:
    sample = SyntheticLandCover(num_samples=2, tile_size=TILE, s2_layout=layout)[1]
    assert sample["s1"].dtype == np.float32 and sample["s1"].shape == (2, TILE, TILE)
    assert sample["s2"].dtype == np.uint16 and sample["s2"].shape == (bands, TILE, TILE)
    assert sample["landcover"].dtype == np.uint8 and sample["landcover"].shape == (TILE, TILE)
    assert 1 <= sample["doy"] <= 365
    assert isinstance(sample["label"], int) and isinstance(sample["key"], str)


def test_satlas_layout_selects_bands_of_the_same_tile() -> None:
    full = SyntheticLandCover(num_samples=1, tile_size=TILE, seed=5)[0]["s2"]
    satlas = SyntheticLandCover(num_samples=1, tile_size=TILE, seed=5, s2_layout="satlas")[0]["s2"]
    np.testing.assert_array_equal(satlas, full[[3, 2, 1, 4, 5, 6, 7, 11, 12]])


def test_label_is_the_dominant_class_and_labels_are_spread(
    dataset: SyntheticLandCover, samples: list[dict]
) -> None:
    for sample in samples[:20]:
        values, counts = np.unique(sample["landcover"], return_counts=True)
        assert sample["label"] == values[counts.argmax()]
    labels = np.array([sample["label"] for sample in samples])
    label_counts = np.bincount(labels, minlength=dataset.num_classes)
    assert (label_counts > 0).all()
    assert label_counts.max() < 0.5 * len(samples)


def test_class_map_is_made_of_blobs_not_pixel_noise(samples: list[dict]) -> None:
    # Neighbouring pixels of independent per-pixel classes would agree ~1/6 of the time.
    agreement = np.mean(
        [
            np.mean(s["landcover"][:, 1:] == s["landcover"][:, :-1])
            for s in samples
            if len(np.unique(s["landcover"])) > 1
        ]
    )
    assert agreement > 0.85


def test_class_map_drives_both_s1_and_s2(dataset: SyntheticLandCover, samples: list[dict]) -> None:
    water = dataset.class_names.index("water")
    bright = [dataset.class_names.index(name) for name in ("forest", "urban")]
    nir = S2_BANDS_SEN12MS.index("B8")
    checked = 0
    for sample in samples:
        landcover = sample["landcover"]
        is_water = landcover == water
        is_bright = np.isin(landcover, bright)
        if is_water.sum() < 20 or is_bright.sum() < 20:
            continue
        vv = sample["s1"][0]
        b8 = sample["s2"][nir].astype(np.float64)
        assert vv[is_water].mean() < vv[is_bright].mean() - 5.0
        assert b8[is_water].mean() < 0.5 * b8[is_bright].mean()
        checked += 1
    assert checked >= 5


def test_values_have_the_scale_of_the_default_statistics(samples: list[dict]) -> None:
    s2 = np.stack([s["s2"] for s in samples[:100]]).astype(np.float64)
    s1 = np.stack([s["s1"] for s in samples[:100]])
    mean_s2, _ = band_stats("s2", "sen12ms")
    mean_s1, _ = band_stats("s1", "sen12ms")
    band_means = s2.mean(axis=(0, 2, 3))
    assert np.all(band_means > 0.5 * np.array(mean_s2))
    assert np.all(band_means < 1.5 * np.array(mean_s2))
    assert np.all(np.abs(s1.mean(axis=(0, 2, 3)) - np.array(mean_s1)) < 3.0)
    assert s2.max() <= np.iinfo(np.uint16).max and s2.max() < 20000
    assert np.isfinite(s1).all()


def test_collate_stacks_with_compact_dtypes(samples: list[dict]) -> None:
    batch = collate_samples(samples[:3])
    assert batch["s1"].dtype == torch.float32 and batch["s1"].shape == (3, 2, TILE, TILE)
    assert batch["s2"].dtype == torch.uint16 and batch["s2"].shape == (3, 13, TILE, TILE)
    assert batch["doy"].dtype == torch.int64 and batch["doy"].tolist() == [
        s["doy"] for s in samples[:3]
    ]
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (3,)
    assert batch["landcover"].dtype == torch.uint8 and batch["landcover"].shape == (3, TILE, TILE)
    assert batch["key"] == [s["key"] for s in samples[:3]]
    as_float = batch["s2"].to("cpu").float()
    assert as_float[1, 4, 5, 6].item() == float(samples[1]["s2"][4, 5, 6])


def test_collate_rejects_missing_fields_and_empty_lists(samples: list[dict]) -> None:
    partial = {key: value for key, value in samples[1].items() if key != "landcover"}
    with pytest.raises(ValueError, match="landcover"):
        collate_samples([samples[0], partial])
    with pytest.raises(ValueError, match="empty"):
        collate_samples([])


def _class_pixel_stats(world: SyntheticLandCover, class_id: int) -> tuple[np.ndarray, float]:
    """Median over tiles of a class's per-band mean, and of its pixels' relative spread in B8."""
    means, spreads = [], []
    for index in range(len(world)):
        tile = world[index]
        inside = tile["landcover"] == class_id
        if inside.sum() < 64:
            continue
        pixels = tile["s2"][:, inside].astype(np.float64)
        means.append(pixels.mean(axis=1))
        nir = pixels[S2_BANDS_SEN12MS.index("B8")]
        spreads.append(nir.std() / nir.mean())
    return np.median(means, axis=0), float(np.median(spreads))


def test_texture_pairs_share_a_spectrum_and_differ_in_texture() -> None:
    paired = SyntheticLandCover(num_samples=150, tile_size=TILE, seed=3, texture_pairs=True)
    assert paired.class_names[:4] == (
        "water_smooth",
        "water_coarse",
        "cropland_smooth",
        "cropland_coarse",
    )
    assert paired.class_names[4:] == ("urban_smooth", "urban_coarse")
    smooth_mean, smooth_spread = _class_pixel_stats(paired, 4)
    coarse_mean, coarse_spread = _class_pixel_stats(paired, 5)
    # One spectrum: the pair's mean reflectance agrees band by band (tile nuisance averages out).
    assert np.abs(coarse_mean / smooth_mean - 1.0).max() < 0.08
    # Told apart by texture: the coarse member's pixels spread several times as much.
    assert coarse_spread > 3.0 * smooth_spread
    # The default world keeps every class's own spectrum: urban is far redder than grassland.
    default = SyntheticLandCover(num_samples=150, tile_size=TILE, seed=3)
    urban_mean, _ = _class_pixel_stats(default, 4)
    grassland_mean, _ = _class_pixel_stats(default, 5)
    red = S2_BANDS_SEN12MS.index("B4")
    assert urban_mean[red] > 1.5 * grassland_mean[red]
    # Paired tiles are scenes: one class covers most of the tile, so near ties are rare.
    paired_cover, default_cover = _top_two_cover(paired), _top_two_cover(default)
    assert paired_cover[:, 0].mean() > default_cover[:, 0].mean() + 0.1
    paired_ties, default_ties = (
        np.mean(cover[:, 0] - cover[:, 1] < 0.1) for cover in (paired_cover, default_cover)
    )
    assert paired_ties < 0.05 and default_ties > 0.1


def _top_two_cover(dataset: SyntheticLandCover) -> np.ndarray:
    """[tiles, 2]: the share of the tile its largest and second-largest classes cover."""
    covers = []
    for index in range(len(dataset)):
        counts = np.bincount(dataset[index]["landcover"].ravel(), minlength=dataset.num_classes)
        covers.append(np.sort(counts)[::-1][:2] / counts.sum())
    return np.array(covers)


def test_the_texture_pairs_key_reaches_the_training_world() -> None:
    cfg = load_config("quickstart", ["train.device=cpu", "train.synthetic.texture_pairs=true"])
    world = build_dataset(cfg)
    assert isinstance(world, SyntheticLandCover) and world.class_names[1] == "water_coarse"
    assert build_dataset(load_config("quickstart")).class_names[1] == "forest"
