"""Per-band statistics: streaming maths, the JSON file, and what the trainer normalises by."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from torch.utils.data import Dataset

from rsdino.data.bands import S1_BANDS, S2_BANDS_SATLAS, S2_BANDS_SEN12MS
from rsdino.data.sources.decode import SkipSample
from rsdino.data.stats import (
    STD_EPSILON,
    BandStatistics,
    StreamingBandStats,
    compute_stats,
    input_band_names,
    load_stats,
    normalizer_stats,
    write_stats,
)
from rsdino.data.storage import LocalStore
from rsdino.data.synthetic import SyntheticLandCover
from rsdino.errors import RsdinoError


def _per_band(arrays: list[np.ndarray]) -> np.ndarray:
    """[C, N] float64 pixels of [C, H, W] / [B, C, H, W] arrays, computed without the module."""
    columns = [a.reshape(-1, *a.shape[-3:]).transpose(1, 0, 2, 3) for a in arrays]
    return np.concatenate([c.reshape(c.shape[0], -1) for c in columns], axis=1).astype(np.float64)


def _assert_matches(stats: BandStatistics, pixels: np.ndarray) -> None:
    finite = np.isfinite(pixels)
    for band in range(pixels.shape[0]):
        values = pixels[band][finite[band]]
        assert stats.mean[band] == pytest.approx(values.mean(), rel=1e-9)
        assert stats.std[band] == pytest.approx(values.std(), rel=1e-9)
        assert stats.minimum[band] == values.min()
        assert stats.maximum[band] == values.max()
        assert stats.nan_count[band] == int((~finite[band]).sum())
    assert stats.count == pixels.shape[1]


def test_hand_checkable_values() -> None:
    stream = StreamingBandStats(2)
    stream.update(np.array([[[1.0, 2.0]], [[10.0, 10.0]]]))  # [C=2, H=1, W=2]
    stream.update(np.array([[[3.0, 4.0]], [[10.0, 30.0]]]))
    stats = stream.result("s1", S1_BANDS)
    # Band 0: 1..4 -> mean 2.5, population variance 1.25. Band 1: 10,10,10,30 -> 15, var 75.
    assert stats.mean == pytest.approx([2.5, 15.0], rel=1e-12)
    assert stats.std == pytest.approx([math.sqrt(1.25), math.sqrt(75.0)], rel=1e-12)
    assert stats.minimum == [1.0, 10.0]
    assert stats.maximum == [4.0, 30.0]
    assert stats.count == 4
    assert stats.nan_count == [0, 0]


def test_streaming_uint16_batches_match_numpy() -> None:
    rng = np.random.default_rng(0)
    # Large offsets and a small spread are where a naive sum-of-squares formula loses digits.
    batches = [
        (60000 + rng.integers(0, 50, size=(b, 13, 5, 7))).astype(np.uint16) for b in (1, 3, 2)
    ]
    batches.append(rng.integers(0, 65535, size=(13, 5, 7)).astype(np.uint16))
    stream = StreamingBandStats(13)
    for batch in batches:
        stream.update(batch)
    _assert_matches(stream.result("s2", S2_BANDS_SEN12MS), _per_band(batches))


def test_streaming_float32_sar_with_nan_and_inf() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.normal(-15.0, 5.0, size=(b, 2, 6, 6)).astype(np.float32) for b in (2, 1, 4)]
    batches[0][0, 0, 0, :3] = np.nan
    batches[1][0, 1, 2, 2] = np.inf
    batches[2][3, 1, :, 0] = -np.inf
    stream = StreamingBandStats(2)
    for batch in batches:
        stream.update(batch)
    stats = stream.result("s1", S1_BANDS)
    assert stats.nan_count == [3, 1 + 6]
    _assert_matches(stats, _per_band(batches))


def test_merge_of_two_halves_equals_the_whole() -> None:
    rng = np.random.default_rng(2)
    batches = [rng.normal(100.0, 3.0, size=(2, 3, 4, 4)) for _ in range(6)]
    first, second = StreamingBandStats(3), StreamingBandStats(3)
    for batch in batches[:2]:
        first.update(batch)
    for batch in batches[2:]:
        second.update(batch)
    first.merge(second)
    _assert_matches(first.result("s2", ("B2", "B3", "B4")), _per_band(batches))


def test_merge_into_an_empty_stream() -> None:
    data = np.arange(12, dtype=np.float64).reshape(1, 3, 2, 2)
    filled, empty = StreamingBandStats(3), StreamingBandStats(3)
    filled.update(data)
    empty.merge(filled)
    # Band b holds 4b..4b+3: mean 4b + 1.5, population std sqrt(1.25).
    stats = empty.result("s2", ("B2", "B3", "B4"))
    assert stats.mean == pytest.approx([1.5, 5.5, 9.5], rel=1e-12)
    assert stats.std == pytest.approx([math.sqrt(1.25)] * 3, rel=1e-12)


def test_constant_band_gets_an_epsilon_std_and_a_warning(caplog) -> None:
    data = np.stack([np.full((4, 4), 7, np.uint16), np.arange(16, dtype=np.uint16).reshape(4, 4)])
    stream = StreamingBandStats(2)
    stream.update(data)
    with caplog.at_level(logging.WARNING, logger="rsdino"):
        stats = stream.result("s1", S1_BANDS)
    assert stats.std[0] == STD_EPSILON
    assert stats.std[1] == pytest.approx(np.arange(16).std(), rel=1e-12)
    assert "VV" in caplog.text
    assert "VH" not in caplog.text


def test_band_without_finite_pixels_is_an_error() -> None:
    data = np.zeros((2, 3, 3), np.float32)
    data[1] = np.nan
    stream = StreamingBandStats(2)
    stream.update(data)
    with pytest.raises(RsdinoError, match="VH"):
        stream.result("s1", S1_BANDS)


def test_wrong_band_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected"):
        StreamingBandStats(13).update(np.zeros((9, 4, 4), np.uint16))


def _example_stats() -> dict[str, BandStatistics]:
    s2 = len(S2_BANDS_SATLAS)
    return {
        "s2": BandStatistics(
            "s2",
            S2_BANDS_SATLAS,
            count=1024,
            mean=[1000.0 + i for i in range(s2)],
            std=[500.0 + i for i in range(s2)],
            minimum=[0.0] * s2,
            maximum=[9000.0] * s2,
            nan_count=[0] * s2,
        ),
        "s1": BandStatistics(
            "s1", S1_BANDS, 1024, [-11.0, -19.5], [4.5, 5.25], [-40.0, -45.0], [5.0, 0.0], [3, 4]
        ),
    }


def test_json_round_trip(tmp_path) -> None:
    stats = _example_stats()
    write_stats(stats, str(tmp_path / "out"))
    assert load_stats(str(tmp_path / "out" / "band_stats.json")) == stats
    write_stats(stats, LocalStore(tmp_path), key="nested/stats.json")
    assert load_stats((tmp_path / "nested" / "stats.json").as_uri()) == stats
    document = json.loads((tmp_path / "nested" / "stats.json").read_text())
    assert document["version"] == 1
    assert document["modalities"]["s1"]["bands"] == ["VV", "VH"]


def _write_document(path, modalities: dict) -> str:
    path.write_text(
        json.dumps({"format": "rsdino-band-stats", "version": 1, "modalities": modalities})
    )
    return str(path)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(RsdinoError, match="rsdino data stats"):
        load_stats(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RsdinoError, match="not valid JSON"):
        load_stats(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"mean": [1.0]}))
    with pytest.raises(RsdinoError, match="not an rsdino band statistics file"):
        load_stats(str(tmp_path / "other.json"))
    future = {"format": "rsdino-band-stats", "version": 99, "modalities": {}}
    (tmp_path / "future.json").write_text(json.dumps(future))
    with pytest.raises(RsdinoError, match="version 99"):
        load_stats(str(tmp_path / "future.json"))


def test_load_rejects_a_band_count_no_layout_has(tmp_path) -> None:
    entry = {
        "bands": list(S2_BANDS_SEN12MS[:10]),
        "count": 4,
        "mean": [1.0] * 10,
        "std": [1.0] * 10,
        "minimum": [0.0] * 10,
        "maximum": [2.0] * 10,
        "nan_count": [0] * 10,
    }
    path = _write_document(tmp_path / "ten.json", {"s2": entry})
    with pytest.raises(RsdinoError, match="10 bands"):
        load_stats(path)


def test_load_rejects_per_band_lists_of_the_wrong_length(tmp_path) -> None:
    entry = {
        "bands": ["VV", "VH"],
        "count": 4,
        "mean": [1.0],
        "std": [1.0, 1.0],
        "minimum": [0.0, 0.0],
        "maximum": [2.0, 2.0],
        "nan_count": [0, 0],
    }
    path = _write_document(tmp_path / "short.json", {"s1": entry})
    with pytest.raises(RsdinoError, match="one value per band"):
        load_stats(path)


def test_normalizer_stats_defaults_without_a_file() -> None:
    assert normalizer_stats(None, "s1", "satlas") == ([-12.5, -20.2], [5.3, 5.9])
    mean, std = normalizer_stats(None, "s2", "satlas")
    assert len(mean) == len(std) == 9
    assert mean[0] == 1370.0  # Satlas starts with B4


def test_normalizer_stats_from_a_file(tmp_path) -> None:
    write_stats(_example_stats(), str(tmp_path))
    path = str(tmp_path / "band_stats.json")
    assert normalizer_stats(path, "s1", "sen12ms") == ([-11.0, -19.5], [4.5, 5.25])
    mean, std = normalizer_stats(path, "s2", "satlas")
    assert mean[:2] == [1000.0, 1001.0]
    assert std[-1] == 508.0
    with pytest.raises(RsdinoError, match="layout 'sen12ms'"):
        normalizer_stats(path, "s2", "sen12ms")


def test_normalizer_stats_for_a_modality_the_file_lacks(tmp_path) -> None:
    write_stats({"s1": _example_stats()["s1"]}, str(tmp_path))
    with pytest.raises(RsdinoError, match="no s2 statistics"):
        normalizer_stats(str(tmp_path / "band_stats.json"), "s2", "satlas")


NAMES = {"s1": S1_BANDS, "s2": S2_BANDS_SEN12MS}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_compute_stats_on_synthetic_matches_numpy(num_workers: int) -> None:
    dataset = SyntheticLandCover(num_samples=20, tile_size=16)
    stats = compute_stats(
        dataset, modalities=("s1", "s2"), band_names=NAMES, num_workers=num_workers
    )
    samples = [dataset[i] for i in range(20)]
    for modality in ("s1", "s2"):
        assert stats[modality].bands == NAMES[modality]
        _assert_matches(stats[modality], _per_band([s[modality] for s in samples]))


def test_compute_stats_subset_is_seeded() -> None:
    dataset = SyntheticLandCover(num_samples=20, tile_size=8)
    subset = compute_stats(dataset, modalities=("s2",), band_names=NAMES, max_samples=5)["s2"]
    assert subset.count == 5 * 8 * 8
    again = compute_stats(dataset, modalities=("s2",), band_names=NAMES, max_samples=5)["s2"]
    assert again.mean == subset.mean
    other = compute_stats(dataset, modalities=("s2",), band_names=NAMES, max_samples=5, seed=1)
    assert other["s2"].mean != subset.mean


class _SkipsIndices(Dataset):
    """A source that skips some samples, as `on_error="skip"` does for bad tiles."""

    def __init__(self, inner: Dataset, skipped: set[int]) -> None:
        self.inner = inner
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        if index in self.skipped:
            raise SkipSample("nan", f"tile{index}")
        return self.inner[index]


def test_compute_stats_leaves_out_skipped_samples() -> None:
    inner = SyntheticLandCover(num_samples=6, tile_size=8)
    stats = compute_stats(_SkipsIndices(inner, {1, 3, 5}), modalities=("s1",), band_names=NAMES)[
        "s1"
    ]
    _assert_matches(stats, _per_band([inner[i]["s1"] for i in (0, 2, 4)]))


def test_compute_stats_errors() -> None:
    satlas = SyntheticLandCover(num_samples=2, tile_size=8, s2_layout="satlas")
    with pytest.raises(RsdinoError, match="does not match bands"):
        compute_stats(satlas, modalities=("s2",), band_names=NAMES)
    with pytest.raises(RsdinoError, match="has no \\['s3'\\] data"):
        compute_stats(satlas, modalities=("s3",), band_names={"s3": ("X",)})
    with pytest.raises(RsdinoError, match="empty"):
        compute_stats(SyntheticLandCover(0), modalities=("s1",), band_names=NAMES)
    with pytest.raises(RsdinoError, match="skipped"):
        compute_stats(_SkipsIndices(satlas, {0, 1}), modalities=("s1",), band_names=NAMES)


def test_normalizer_stats_of_picked_geotiff_bands(tmp_path) -> None:
    mean, std = normalizer_stats(None, "s2", "sen12ms")
    assert normalizer_stats(None, "s2", "sen12ms", [4, 3, 2]) == (mean[3:0:-1], std[3:0:-1])
    assert input_band_names("s2", "sen12ms", [4, 3, 2]) == ("B4", "B3", "B2")
    write_stats(_example_stats(), str(tmp_path))
    path = str(tmp_path / "band_stats.json")
    file_mean, file_std = normalizer_stats(path, "s2", "satlas")
    assert normalizer_stats(path, "s2", "satlas", [9, 1]) == (
        [file_mean[8], file_mean[0]],
        [file_std[8], file_std[0]],
    )
    # Sentinel-1 has no band selection: its two bands stay as they are.
    assert normalizer_stats(None, "s1", "sen12ms", [2]) == normalizer_stats(None, "s1", "sen12ms")
