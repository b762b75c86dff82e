"""`rsdino data clouds`: s2cloudless scores of real GeoTIFF trees, locally and on S3."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
from s3_server import put_objects
from source_fixtures import TRAIN_ROI, sen12ms_keys, write_geotiff

from rsdino.cli import main
from rsdino.data import clouds
from rsdino.data.band_tables import S2_BANDS_SEN12MS
from rsdino.data.cloud_scores import SCORES_KEY
from rsdino.data.clouds import DILATION_SIZE, load_detector, score_tiles

pytest_plugins = ["s3_server"]

SIZE = 64
BLOCK = 32  # side of the square cloud in the middle of a cloudy tile
# Typical digital numbers (reflectance x 10000) of clear vegetation: dark visible bands, a bright
# near-infrared plateau, almost nothing in the B10 cirrus band.
CLEAR = {
    "B1": 1200,
    "B2": 600,
    "B3": 700,
    "B4": 400,
    "B5": 900,
    "B6": 2200,
    "B7": 2700,
    "B8": 3000,
    "B8A": 3100,
    "B9": 900,
    "B10": 10,
    "B11": 1500,
    "B12": 700,
}
# A thick cloud: bright and flat across the visible and near-infrared bands, visible in cirrus,
# and bright in the shortwave infrared too (snow, the other bright surface, is dark there).
CLOUD = {
    "B1": 7000,
    "B2": 7200,
    "B3": 7000,
    "B4": 7100,
    "B5": 7200,
    "B6": 7300,
    "B7": 7400,
    "B8": 7500,
    "B8A": 7400,
    "B9": 4000,
    "B10": 1200,
    "B11": 5000,
    "B12": 4000,
}


def clear_tile() -> np.ndarray:
    return np.stack([np.full((SIZE, SIZE), CLEAR[band], np.uint16) for band in S2_BANDS_SEN12MS])


def overcast_tile() -> np.ndarray:
    return np.stack([np.full((SIZE, SIZE), CLOUD[band], np.uint16) for band in S2_BANDS_SEN12MS])


def cloudy_tile() -> np.ndarray:
    tile = clear_tile()
    low, high = (SIZE - BLOCK) // 2, (SIZE + BLOCK) // 2
    for index, band in enumerate(S2_BANDS_SEN12MS):
        tile[index, low:high, low:high] = CLOUD[band]
    return tile


def test_a_cloud_block_scores_about_its_area() -> None:
    detector, settings = load_detector(0.4)
    clear, cloudy = score_tiles(detector, [clear_tile(), cloudy_tile()])
    assert clear["cloud_fraction"] == 0.0 and clear["mean_probability"] < 0.1
    assert cloudy["mean_probability"] > clear["mean_probability"]
    # Averaging over a disk and thresholding at 0.4 (< 0.5) moves a straight cloud edge outwards
    # by under one pixel; dilation adds DILATION_SIZE pixels. So the mask covers the block and
    # at most a (1 + DILATION_SIZE)-pixel rim around it (corners, rounded by both disks, less).
    share = BLOCK**2 / SIZE**2
    grown_share = (BLOCK + 2 * (1 + DILATION_SIZE)) ** 2 / SIZE**2
    assert share <= cloudy["cloud_fraction"] <= grown_share
    assert settings["threshold"] == 0.4 and settings["name"] == "s2cloudless"


def s2_key(time: int) -> str:
    return sen12ms_keys(TRAIN_ROI, time, 0, "2018-03-01", f"2018-03-{time + 1:02d}")[1]


def write_tree(root: Path, tiles: dict[int, np.ndarray]) -> dict[str, bytes]:
    """Sentinel-2 files of a SEN12MS-CR-TS tree (time index -> tile); returns key -> bytes."""
    files = {}
    for time, tile in tiles.items():
        write_geotiff(root / s2_key(time), tile)
        files[s2_key(time)] = (root / s2_key(time)).read_bytes()
    return files


def summary(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_scores_every_key_then_only_new_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, {0: clear_tile(), 1: cloudy_tile(), 2: clear_tile()})
    assert main(["data", "clouds", str(tree)]) == 0
    assert summary(capsys).startswith("scored 3, skipped 0 already scored, 0 bad")
    first = (tree / SCORES_KEY).read_bytes()
    document = json.loads(first)
    scores = document["acquisitions"]
    assert list(scores) == sorted(scores) == sorted(s2_key(t) for t in range(3))
    assert scores[s2_key(1)]["cloud_fraction"] > scores[s2_key(0)]["cloud_fraction"] == 0.0
    assert document["version"] == 1
    assert document["detector"] == {
        "name": "s2cloudless",
        "version": document["detector"]["version"],
        "threshold": 0.4,
        "average_over": 4,
        "dilation_size": 2,
    }

    assert main(["data", "clouds", str(tree)]) == 0
    assert summary(capsys).startswith("scored 0, skipped 3 already scored, 0 bad")
    assert (tree / SCORES_KEY).read_bytes() == first

    write_tree(tree, {3: overcast_tile()})
    assert main(["data", "clouds", str(tree), "--batch", "2"]) == 0
    line = summary(capsys)
    assert line.startswith("scored 1, skipped 3 already scored, 0 bad")
    assert "1 of 4 above 0.5" in line
    rescored = json.loads((tree / SCORES_KEY).read_bytes())["acquisitions"]
    assert rescored.pop(s2_key(3))["cloud_fraction"] == 1.0 and rescored == scores

    assert main(["data", "clouds", str(tree), "--threshold", "0.6"]) == 0
    announced, last = capsys.readouterr().out.strip().splitlines()
    assert "threshold 0.4 -> 0.6" in announced and "4 scores" in announced
    assert last.startswith("scored 4, skipped 0 already scored")
    assert json.loads((tree / SCORES_KEY).read_bytes())["detector"]["threshold"] == 0.6


def test_bad_tiles_are_skipped_and_listed_or_fail_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tree, out = tmp_path / "tree", tmp_path / "scores"
    write_tree(tree, {0: clear_tile(), 1: cloudy_tile()})
    write_tree(tree, {2: clear_tile()})
    (tree / s2_key(2)).write_bytes(b"not a GeoTIFF")
    write_geotiff(tree / s2_key(3), clear_tile()[:4])  # a 4-band file is no SEN12MS S2 tile
    argv = ["data", "clouds", str(tree), "--out", str(out)]
    assert main(argv) == 0
    line = summary(capsys)
    assert line.startswith("scored 2, skipped 0 already scored, 2 bad")
    assert f"{s2_key(2)} (corrupt)" in line and f"{s2_key(3)} (band_count)" in line
    assert sorted(json.loads((out / SCORES_KEY).read_bytes())["acquisitions"]) == [
        s2_key(0),
        s2_key(1),
    ]
    assert not (tree / SCORES_KEY).exists()

    # Saved after every batch, a run that stops at the bad tile keeps the scores before it.
    monkeypatch.setattr(clouds, "SAVE_EVERY_BATCHES", 1)
    partial = tmp_path / "partial"
    argv = ["data", "clouds", str(tree), "--out", str(partial), "--batch", "1"]
    assert main([*argv, "--on-error", "fail"]) == 3  # the data error code
    err = one_line_error(capsys)
    assert s2_key(2) in err and "cannot decode GeoTIFF" in err
    assert sorted(json.loads((partial / SCORES_KEY).read_bytes())["acquisitions"]) == [
        s2_key(0),
        s2_key(1),
    ]


def test_a_file_as_destination_fails_before_any_tile_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()  # reading it would fail with "no sen12ms samples"
    assert main(["data", "clouds", str(tmp_path / "empty"), "--out", str(a_file)]) == 4
    err = one_line_error(capsys)
    assert f"{a_file} is a file, not a folder" in err and "no sen12ms samples" not in err


def test_scores_on_s3(
    bucket: str,
    s3_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    monkeypatch.setenv("RSDINO_S3_PATH_STYLE", "1")
    files = write_tree(tmp_path / "tree", {0: clear_tile(), 1: cloudy_tile()})
    put_objects(s3_env, bucket, {f"tree/{key}": data for key, data in files.items()})
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    argv = ["data", "clouds", f"s3://{bucket}/tree", "--workers", "2"]
    assert main(argv) == 0
    assert summary(capsys).startswith("scored 2, skipped 0 already scored, 0 bad")
    first = client.get_object(Bucket=bucket, Key=f"tree/{SCORES_KEY}")["Body"].read()
    assert sorted(json.loads(first)["acquisitions"]) == sorted(files)
    assert main(argv) == 0
    assert summary(capsys).startswith("scored 0, skipped 2 already scored")
    assert client.get_object(Bucket=bucket, Key=f"tree/{SCORES_KEY}")["Body"].read() == first
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(entry["Key"] for entry in listed) == sorted(
        [f"tree/{SCORES_KEY}", *(f"tree/{key}" for key in files)]
    )  # the destination probe left nothing behind


def test_missing_s2cloudless_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tree(tmp_path / "tree", {0: clear_tile()})
    monkeypatch.setitem(sys.modules, "s2cloudless", None)  # `import s2cloudless` now fails
    assert main(["data", "clouds", str(tmp_path / "tree")]) == 1
    assert "pip install 'rsdino[clouds]'" in one_line_error(capsys)
    assert not (tmp_path / "tree" / SCORES_KEY).exists()
