"""Training reads real Sen12MS-CR-TS GeoTIFFs, from a local folder and from S3 on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, tiny_multimodal_config
from s3_server import put_objects
from source_fixtures import write_sen12ms_tree

from rsdino.cli import main
from rsdino.config.loader import ConfigError, load_config
from rsdino.errors import ExitCode
from rsdino.train.loop import train

pytest_plugins = ["s3_server"]


def _sen12ms(uri: str) -> list[str]:
    return [
        "train.dataset.source=sen12ms",
        f"train.dataset.uri={uri}",
        "train.batch_size_per_gpu=2",
        "train.num_workers=1",
    ]


def test_unimodal_training_from_local_sen12ms_tree(tmp_path: Path) -> None:
    write_sen12ms_tree(tmp_path / "data")
    result = train(tiny_config(*_sen12ms(str(tmp_path / "data"))), tmp_path / "run")
    assert result.final_step == 6


def test_multimodal_training_from_s3(tmp_path: Path, s3_env: str, bucket: str) -> None:
    files = write_sen12ms_tree(tmp_path / "data")
    put_objects(s3_env, bucket, {f"sen12ms/{key}": data for key, data in files.items()})
    cfg = tiny_multimodal_config(
        *_sen12ms(f"s3://{bucket}/sen12ms"), f"train.storage.endpoint_url={s3_env}"
    )
    result = train(cfg, tmp_path / "run")
    assert result.final_step == 6
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").open()]
    assert np.isfinite(records[-1]["total"])


def test_fork_dataset_string_maps_to_the_source(tmp_path: Path) -> None:
    cfg = load_config(
        "vitl16_short_multimodal", ["train.dataset_path=Multimodality:split=TRAIN:root=s3://b/x"]
    )
    assert (cfg.train.dataset.source, cfg.train.dataset.split) == ("sen12ms", "train")
    assert cfg.train.dataset.uri == "s3://b/x"
    satlas = load_config("vitl16_short_s2", ["train.dataset_path=Sentinel2:split=TRAIN:root=/d"])
    assert (satlas.train.dataset.source, satlas.train.dataset.s2_layout) == ("satlas", "satlas")
    with pytest.raises(ConfigError, match=r"train\.dataset_path"):
        load_config("quickstart", ["train.dataset_path=ImageNet:split=TRAIN:root=/d"])


def test_empty_or_missing_dataset_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    for uri, pattern, exit_code in [
        (tmp_path / "empty", "no sen12ms samples found", ExitCode.DATA),
        (tmp_path / "missing", "not a directory", ExitCode.STORAGE),
    ]:
        argv = ["train", "--config", "quickstart", "--output-dir", str(tmp_path / "run")]
        code = main([*argv, *_sen12ms(str(uri))])
        err = capsys.readouterr().err.strip()
        assert code == exit_code
        assert len(err.splitlines()) == 1 and pattern in err


def test_source_without_uri_or_with_wrong_layout_fails_in_config() -> None:
    with pytest.raises(
        ConfigError, match=r"train\.dataset\.uri is needed by train\.dataset\.source=.sen12ms."
    ):
        load_config("quickstart", ["train.dataset.source=sen12ms"])
    with pytest.raises(ConfigError, match=r"set train\.dataset\.s2_layout=satlas"):
        load_config("quickstart", ["train.dataset.source=satlas", "train.dataset.uri=/d"])
    with pytest.raises(ConfigError, match="paired Sentinel-1/-2 data"):
        load_config(
            "quickstart_multimodal",
            ["train.dataset.source=geotiff", "train.dataset.uri=/d"],
        )
