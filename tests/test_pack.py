"""Packing: a seeded, deterministic layout, resumable shard by shard, with bad samples counted."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from torch.utils.data import Dataset

from rsdino.data.pack import describe_report, pack_dataset
from rsdino.data.sources import SkipSample
from rsdino.data.storage import LocalStore
from rsdino.data.synthetic import SyntheticLandCover
from rsdino.errors import RsdinoError

DESCRIPTION = {"source": "synthetic", "num_samples": 50}
# A 16 x 16 synthetic sample: s2 13 x uint16, s1 2 x float32, landcover 1 x uint8 per pixel.
SAMPLE_BYTES = 16 * 16 * (13 * 2 + 2 * 4 + 1)


class CountingSource(Dataset):
    """Wraps a source and records which indices were read (the packer reads from threads)."""

    def __init__(self, source: Dataset, bad: dict[int, str] | None = None) -> None:
        self.source = source
        self.bad = bad or {}
        self.read: list[int] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        with self._lock:
            self.read.append(index)
        if index in self.bad:
            raise SkipSample(self.bad[index], f"tile-{index}")
        return self.source[index]


def pack(source: Dataset, root: Path, **kwargs: object):
    options = {"samples_per_chunk": 4, "chunks_per_shard": 3, "description": DESCRIPTION}
    return pack_dataset(source, LocalStore(root), **{**options, **kwargs})


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def index_keys(root: Path, shard_id: int) -> list[str]:
    index = json.loads((root / f"shards/shard-{shard_id:06d}.json").read_text())
    return [sample["key"] for chunk in index["chunks"] for sample in chunk["samples"]]


def test_pack_writes_shards_and_manifest(tmp_path: Path) -> None:
    report = pack(SyntheticLandCover(num_samples=50, tile_size=16), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())

    # 50 samples, 4 per chunk, 3 chunks (12 samples) per shard: 4 full shards and one of 2.
    assert [s["samples"] for s in manifest["shards"]] == [12, 12, 12, 12, 2]
    assert [s["chunks"] for s in manifest["shards"]] == [3, 3, 3, 3, 1]
    assert [s["nbytes"] for s in manifest["shards"]] == [12 * SAMPLE_BYTES] * 4 + [2 * SAMPLE_BYTES]
    assert manifest["total_samples"] == 50 and manifest["skipped_samples"] == 0
    assert manifest["modalities"] == ["s1", "s2"]
    assert manifest["band_layout"]["s2"][:3] == ["B1", "B2", "B3"]
    assert manifest["band_layout"]["s1"] == ["VV", "VH"]
    assert manifest["source"] == DESCRIPTION
    assert (report.shards_written, report.shards_skipped, report.total_samples) == (5, 0, 50)
    assert report.total_bytes == 50 * SAMPLE_BYTES

    packed = [key for shard_id in range(5) for key in index_keys(tmp_path, shard_id)]
    expected = [f"synthetic/seed0/{i:06d}" for i in range(50)]
    assert sorted(packed) == expected
    assert packed != expected  # shuffled, so chunks mix tiles from all over the dataset


def test_pack_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    pack(SyntheticLandCover(num_samples=50, tile_size=16), tmp_path / "a", codec="zlib")
    pack(SyntheticLandCover(num_samples=50, tile_size=16), tmp_path / "b", codec="zlib")
    first = files(tmp_path / "a")
    assert first == files(tmp_path / "b")

    source = CountingSource(SyntheticLandCover(num_samples=50, tile_size=16))
    report = pack(source, tmp_path / "a", codec="zlib")
    assert (report.shards_written, report.shards_skipped) == (0, 5)
    assert source.read == []
    assert files(tmp_path / "a") == first

    other_seed = pack(source, tmp_path / "a", codec="zlib", seed=1)
    assert other_seed.shards_written == 5  # other settings: nothing is reused


@pytest.mark.parametrize("damage", ["delete_index", "truncate_data"])
def test_rerun_repairs_only_the_damaged_shard(tmp_path: Path, damage: str) -> None:
    pack(SyntheticLandCover(num_samples=50, tile_size=16), tmp_path)
    before = files(tmp_path)
    if damage == "delete_index":
        (tmp_path / "shards/shard-000002.json").unlink()
    else:
        data = tmp_path / "shards/shard-000002.bin"
        data.write_bytes(data.read_bytes()[:100])

    source = CountingSource(SyntheticLandCover(num_samples=50, tile_size=16))
    report = pack(source, tmp_path, read_workers=1)
    assert (report.shards_written, report.shards_skipped) == (1, 4)
    assert files(tmp_path) == before
    read_keys = {f"synthetic/seed0/{i:06d}" for i in source.read}
    assert set(index_keys(tmp_path, 2)) <= read_keys
    assert not read_keys & set(index_keys(tmp_path, 0) + index_keys(tmp_path, 1))


def test_chunks_per_shard_follows_the_target_size(tmp_path: Path) -> None:
    chunk_bytes = 4 * SAMPLE_BYTES
    report = pack(
        SyntheticLandCover(num_samples=50, tile_size=16),
        tmp_path,
        chunks_per_shard=None,
        target_shard_bytes=2 * chunk_bytes + chunk_bytes // 2,
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["chunks_per_shard"] == 2
    # 13 chunks at 2 per shard.
    assert report.shards_written == 7
    assert manifest["shards"][0]["nbytes"] == 2 * chunk_bytes


def test_skipped_samples_are_left_out_and_counted(tmp_path: Path) -> None:
    bad = {3: "nan", 7: "corrupt", 8: "nan"}
    source = CountingSource(SyntheticLandCover(num_samples=10, tile_size=8), bad)
    report = pack(source, tmp_path, samples_per_chunk=2, chunks_per_shard=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())

    assert (report.total_samples, report.skipped_samples) == (7, 3)
    assert report.skipped_by_kind == {"corrupt": 1, "nan": 2}
    assert manifest["skipped_by_kind"] == {"corrupt": 1, "nan": 2}
    assert describe_report(report).endswith("3 bad samples left out (corrupt: 1, nan: 2)")
    assert [s["samples"] for s in manifest["shards"]] == [4, 3]
    packed = index_keys(tmp_path, 0) + index_keys(tmp_path, 1)
    good = [i for i in range(10) if i not in bad]
    assert sorted(packed) == [f"synthetic/seed0/{i:06d}" for i in good]

    first = files(tmp_path)
    again = pack(
        CountingSource(SyntheticLandCover(num_samples=10, tile_size=8), bad),
        tmp_path,
        samples_per_chunk=2,
        chunks_per_shard=2,
    )
    assert (again.shards_written, again.skipped_samples) == (0, 3)
    assert files(tmp_path) == first


def test_a_source_of_only_bad_samples_is_an_error(tmp_path: Path) -> None:
    source = CountingSource(
        SyntheticLandCover(num_samples=3, tile_size=8), dict.fromkeys(range(3), "nan")
    )
    with pytest.raises(RsdinoError, match="skipped all 3 samples"):
        pack(source, tmp_path, chunks_per_shard=None)
    assert not (tmp_path / "manifest.json").exists()


def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    source = SyntheticLandCover(num_samples=2, tile_size=8)
    with pytest.raises(ValueError, match="samples_per_chunk"):
        pack(source, tmp_path, samples_per_chunk=0)
    with pytest.raises(ValueError, match="codec"):
        pack(source, tmp_path, codec="gzip")
    with pytest.raises(RsdinoError, match="no samples"):
        pack(SyntheticLandCover(num_samples=0), tmp_path)
