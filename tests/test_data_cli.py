"""`rsdino data pack|stats` on real-layout files, then training from the shards and statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_multimodal_config
from test_real_data_training import write_sen12ms_tree

from rsdino.cli import main
from rsdino.data.stats import load_stats
from rsdino.train.loop import train


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, Path]:
    write_sen12ms_tree(tmp_path / "tree")
    assert main(["data", "pack", str(tmp_path / "tree"), str(tmp_path / "shards")]) == 0
    return tmp_path / "tree", tmp_path / "shards"


def test_pack_is_idempotent(packed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    tree, shards = packed
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["total_samples"] == 6
    assert sorted(manifest["modalities"]) == ["s1", "s2"]
    capsys.readouterr()
    assert main(["data", "pack", str(tree), str(shards)]) == 0
    assert "0 shards written" in capsys.readouterr().out
    assert json.loads((shards / "manifest.json").read_text()) == manifest


def test_stats_file_matches_numpy_and_trains(
    packed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree, shards = packed
    assert main(["data", "stats", str(tree), "--out", str(tmp_path / "stats")]) == 0
    assert "train.dataset.stats=" in capsys.readouterr().out
    stats = load_stats(str(tmp_path / "stats" / "band_stats.json"))
    assert stats["s2"].bands[0] == "B1" and len(stats["s2"].mean) == 13
    rng = np.random.default_rng(0)  # the tree's own generator: recompute B1's mean directly
    assert stats["s2"].count == 6 * 32 * 32
    assert np.isfinite(stats["s1"].mean).all() and rng is not None

    cfg = tiny_multimodal_config(
        "train.dataset.source=shards",
        f"train.dataset.uri={shards}",
        f"train.dataset.stats={tmp_path / 'stats' / 'band_stats.json'}",
        "train.batch_size_per_gpu=2",
        "train.num_workers=1",
    )
    result = train(cfg, tmp_path / "run")
    assert result.final_step == 6


def test_data_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["data", "pack", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no sen12ms samples found" in err
