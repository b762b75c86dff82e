"""`rsdino data pack|stats` on real-layout files, then training from the shards and statistics."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import pytest
from conftest import tiny_multimodal_config
from source_fixtures import (
    TRAIN_ROI,
    random_s1,
    random_s2,
    sen12ms_keys,
    sen12ms_tree_arrays,
    write_geotiff,
    write_sen12ms_tree,
)

from rsdino.cli import main
from rsdino.data.band_tables import S2_BANDS_SEN12MS
from rsdino.data.stats import load_stats
from rsdino.train.loop import train

pytest_plugins = ["s3_server"]


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
    # The expected values come from the arrays written into the tree, by numpy in one pass.
    arrays = sen12ms_tree_arrays()
    for modality, stacked, bands in (
        ("s1", np.stack([s1 for _, s1, _, _ in arrays]), ["VV", "VH"]),
        ("s2", np.stack([s2 for _, _, _, s2 in arrays]), list(S2_BANDS_SEN12MS)),
    ):
        measured = stats[modality]
        expected = stacked.astype(np.float64)
        assert list(measured.bands) == bands and measured.count == len(arrays) * 32 * 32
        np.testing.assert_allclose(measured.mean, expected.mean(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(measured.std, expected.std(axis=(0, 2, 3)), rtol=1e-12)

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
    # A dataset with no samples is a data error (exit code 3 in the README's table).
    assert main(["data", "pack", str(tmp_path / "empty"), str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no sen12ms samples found" in err


# --- destinations are checked before the work; every failure is one line ---------------------


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _unwritable_folder() -> Path:
    """A folder nobody (root included) can create files in: sysfs refuses every new file."""
    folder = Path("/sys")
    try:
        (folder / "rsdino-probe").touch()
    except OSError:
        return folder
    pytest.skip("/sys accepts new files here; no unwritable folder to test with")


@pytest.mark.parametrize("command", ["pack", "stats"])
def test_a_file_as_destination_fails_before_the_source_is_read(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    missing_source = str(tmp_path / "empty")  # reading it would fail: "no sen12ms samples"
    argv = {
        "pack": ["data", "pack", missing_source, str(a_file)],
        "stats": ["data", "stats", missing_source, "--out", str(a_file)],
    }[command]
    assert main(argv) == 4
    err = _one_line_error(capsys)
    assert f"{a_file} is a file, not a folder" in err and "no sen12ms samples" not in err
    nested = str(a_file / "sub")  # under a file: NotADirectoryError from mkdir
    argv[argv.index(str(a_file))] = nested
    assert main(argv) == 4
    err = _one_line_error(capsys)
    assert nested in err and f"{a_file} is a file" in err


def test_stats_on_an_unwritable_destination_computes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    write_sen12ms_tree(tmp_path / "tree")
    out = _unwritable_folder() / "rsdino-stats"
    with caplog.at_level("INFO"):
        assert main(["data", "stats", str(tmp_path / "tree"), "--out", str(out)]) == 4
    err = _one_line_error(capsys)
    assert str(out) in err and "choose a writable folder" in err
    assert "band statistics measured" not in caplog.text


def test_stats_needs_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["data", "stats", str(tmp_path)])
    assert exited.value.code == 2 and "--out" in capsys.readouterr().err


def test_s3_destinations_are_probed_first(
    tmp_path: Path,
    bucket: str,
    s3_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    monkeypatch.setenv("RSDINO_S3_PATH_STYLE", "1")
    (tmp_path / "empty").mkdir()
    missing = str(tmp_path / "empty")  # reading it fails with "no sen12ms samples found"
    assert main(["data", "stats", missing, "--out", "s3://no-such-bucket-rsdino/stats"]) == 6
    err = _one_line_error(capsys)
    assert "s3://no-such-bucket-rsdino/stats" in err and "no sen12ms samples" not in err
    # A bucket that takes writes passes the probe, which leaves no object behind.
    assert main(["data", "pack", missing, f"s3://{bucket}/packed"]) == 3
    assert "no sen12ms samples found" in _one_line_error(capsys)
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_mixed_band_counts_name_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(3)
    write_geotiff(tmp_path / "tiles/a.tif", random_s2(rng))
    write_geotiff(tmp_path / "tiles/b.tif", random_s2(rng, bands=4))
    src = str(tmp_path / "tiles")
    out = str(tmp_path / "stats")
    argv = ["data", "stats", src, "--source", "geotiff", "--out", out, "--workers", "0"]
    assert main([*argv, "--on-error", "fail"]) == 3
    err = _one_line_error(capsys)
    assert "b.tif: has 4 bands, expected 13" in err
    assert main(argv) == 0  # skip: measured on the 13-band file, the other one counted
    assert load_stats(f"{out}/band_stats.json")["s2"].count == 16 * 16


def test_pack_summary_counts_missing_partners_and_help_shows_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_sen12ms_tree(tmp_path / "tree")
    s1_key, _ = sen12ms_keys(TRAIN_ROI, 99, 0, "2018-03-01", "2018-03-02")
    write_geotiff(tmp_path / "tree" / s1_key, random_s1(np.random.default_rng(1), 32))
    assert main(["data", "pack", str(tmp_path / "tree"), str(tmp_path / "shards")]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("packed 6 samples")
    assert summary.endswith("; 1 dropped while indexing the source (missing_partner: 1)")
    for command, defaults in {
        "pack": ["(default: 8)", "(default: 256)", "(default: none)", "(default: 0)"],
        "stats": ["(default: all samples)", "(default: 0)", "(default: sen12ms)"],
    }.items():
        with pytest.raises(SystemExit):
            main(["data", command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(default in text for default in defaults), (command, text)
