"""train.clouds: training leaves out the acquisitions `rsdino data clouds` scored cloudy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_multimodal_config
from metrics_fixtures import free_port, scrape, value
from s3_server import put_objects
from source_fixtures import sen12ms_tree_arrays, write_sen12ms_tree

from rsdino.cli import main
from rsdino.config.loader import ConfigError, load_config
from rsdino.data.build import DatasetError, build_dataset, cloudy_marked
from rsdino.data.cloud_scores import SCORES_KEY, scores_document
from rsdino.data.collate import collate_samples
from rsdino.errors import ExitCode
from rsdino.train.dist import DistContext
from rsdino.train.loop import Trainer, train
from rsdino.train.metrics import StepCost, start_metrics

pytest_plugins = ["s3_server"]
CPU = torch.device("cpu")

# Cloud fraction of each of the tree's six acquisitions, in key order.
FRACTIONS = (0.0, 0.9, 0.3, 0.31, 1.0, 0.05)


def _s2_keys() -> list[str]:
    return [s2_key for _, _, s2_key, _ in sen12ms_tree_arrays()]


def _scores(fractions: tuple[float, ...] = FRACTIONS) -> bytes:
    scores = {
        key: {"cloud_fraction": fraction, "mean_probability": fraction}
        for key, fraction in zip(_s2_keys(), fractions, strict=True)
    }
    return scores_document({"name": "s2cloudless", "threshold": 0.4}, scores)


def _config(uri: str, *extra: str):
    return tiny_multimodal_config(
        "train.dataset.source=sen12ms",
        f"train.dataset.uri={uri}",
        "train.batch_size_per_gpu=2",
        *extra,
    )


@pytest.fixture
def scored_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "data"
    write_sen12ms_tree(tree)
    (tree / SCORES_KEY).write_bytes(_scores())
    return tree


def test_max_fraction_drops_exactly_the_acquisitions_above_it(scored_tree: Path) -> None:
    dataset = build_dataset(_config(str(scored_tree), "train.clouds.max_fraction=0.3"))
    expected = [key for key, f in zip(_s2_keys(), FRACTIONS, strict=True) if f <= 0.3]
    assert dataset.source.keys == expected  # 0.3 itself stays, 0.31 goes
    assert dataset.source.cloudy_left_out == 3
    assert len(build_dataset(_config(str(scored_tree))).source.keys) == 6  # off by default


def test_training_logs_and_exports_what_the_filter_left_out(
    scored_tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    cfg = _config(str(scored_tree), "train.clouds.max_fraction=0.3", "metrics.enabled=false")
    with caplog.at_level(logging.INFO, logger="rsdino"):
        result = train(cfg, run)
    assert result.final_step == 6
    assert "sen12ms at" in caplog.text
    assert "3 samples (3 acquisitions left out: cloud fraction > 0.3)" in caplog.text
    records = [json.loads(line) for line in (run / "train_log.jsonl").open()]
    assert [record["cloudy_left_out"] for record in records] == [3] * 6


def test_the_gauge_counts_the_left_out_acquisitions(scored_tree: Path) -> None:
    cfg = _config(
        str(scored_tree),
        "train.clouds.max_fraction=0.3",
        "metrics.enabled=true",
        "metrics.host=127.0.0.1",
        f"metrics.port={free_port()}",
    )
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    metrics = start_metrics(cfg, ctx, "quickstart_multimodal", StepCost(flops=0.0, tokens=0))
    try:
        metrics.watch_data(build_dataset(cfg))
        assert value(scrape(metrics.url), "rsdino_data_cloudy_left_out") == 3
    finally:
        metrics.close()


def test_missing_or_partial_scores_name_the_file_and_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "data"
    write_sen12ms_tree(tree)
    cfg = _config(str(tree), "train.clouds.max_fraction=0.5")
    with pytest.raises(DatasetError, match=rf"no cloud score file at {tree}/clouds\.json; run "):
        build_dataset(cfg)
    (tree / SCORES_KEY).write_bytes(_scores()[:40])
    with pytest.raises(DatasetError, match=r"is not a version 1 cloud score file"):
        build_dataset(cfg)
    document = json.loads(_scores())
    del document["acquisitions"][_s2_keys()[2]]
    (tree / SCORES_KEY).write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=rf"1 of 6 acquisitions have no score .*{_s2_keys()[2]}"):
        build_dataset(cfg)
    (tree / SCORES_KEY).write_bytes(_scores((1.0,) * 6))
    argv = ["train", "--config", "quickstart_multimodal", "--output-dir", str(tmp_path / "run")]
    overrides = [
        "train.dataset.source=sen12ms",
        f"train.dataset.uri={tree}",
        "train.clouds.max_fraction=0.5",
        "train.device=cpu",
    ]
    assert main([*argv, *overrides]) == ExitCode.DATA
    err = capsys.readouterr().err.strip()
    assert err.endswith("leaves none of the 6 acquisitions at " + f"{tree}; raise it"), err


def test_scores_elsewhere_and_on_s3(tmp_path: Path, s3_env: str, bucket: str) -> None:
    files = write_sen12ms_tree(tmp_path / "data")
    put_objects(s3_env, bucket, {f"sen12ms/{key}": data for key, data in files.items()})
    put_objects(s3_env, bucket, {"scores/mine.json": _scores()})
    cfg = _config(
        f"s3://{bucket}/sen12ms",
        f"train.storage.endpoint_url={s3_env}",
        "train.clouds.max_fraction=0.05",
        f"train.clouds.scores=s3://{bucket}/scores/mine.json",
    )
    assert build_dataset(cfg).source.keys == [_s2_keys()[0], _s2_keys()[5]]


SEN12MS_CLOUDS = [
    "train.dataset.source=sen12ms",
    "train.dataset.uri=/d",
    "train.clouds.max_fraction=0.5",
]


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["train.clouds.max_fraction=0.5"], r"needs train\.dataset\.source=sen12ms"),
        (["train.clouds.max_fraction=1.5"], r"train\.clouds\.max_fraction=1\.5 must be in"),
        (["train.clouds.scores=/x.json"], r"train\.clouds\.scores='/x\.json' applies only with"),
        (
            [*SEN12MS_CLOUDS, "train.clouds.policy=sar_only"],
            r"policy=sar_only shows the student Sentinel-1 .* needs train\.multimodal=true",
        ),
        (
            [*SEN12MS_CLOUDS, "train.clouds.policy=weight", "train.clouds.loss_weight=2"],
            r"train\.clouds\.loss_weight=2\.0 must be in \[0, 1\]",
        ),
        (
            [*SEN12MS_CLOUDS, "train.clouds.loss_weight=0.5"],
            r"train\.clouds\.loss_weight=0\.5 applies only with train\.clouds\.policy=weight",
        ),
        (
            [*SEN12MS_CLOUDS, "train.clouds.policy=mask"],
            r"train\.clouds\.policy='mask' is not one of drop, sar_only, weight",
        ),
    ],
)
def test_bad_cloud_keys_name_the_key(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config("quickstart", overrides)


def test_training_reads_the_file_rsdino_data_clouds_writes(tmp_path: Path) -> None:
    tree = tmp_path / "data"
    write_sen12ms_tree(tree)
    assert main(["data", "clouds", str(tree)]) == 0
    written = json.loads((tree / SCORES_KEY).read_bytes())["acquisitions"]
    threshold = sorted(score["cloud_fraction"] for score in written.values())[2]
    cfg = _config(str(tree), f"train.clouds.max_fraction={threshold}")
    kept = build_dataset(cfg).source.keys
    assert kept == [key for key in _s2_keys() if written[key]["cloud_fraction"] <= threshold]
    assert len(kept) >= 3


def test_sar_only_keeps_cloudy_samples_and_shows_the_student_their_sar_alone(
    scored_tree: Path, tmp_path: Path
) -> None:
    sar_only = ["train.clouds.max_fraction=0.3", "train.clouds.policy=sar_only"]
    cfg = _config(
        str(scored_tree), *sar_only, "train.modality_dropout=0", "train.batch_size_per_gpu=6"
    )
    dataset = build_dataset(cfg)
    assert len(dataset) == 6 and cloudy_marked(dataset) == 3
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    batch = collate_samples([dataset[index] for index in range(6)])
    cloudy = torch.tensor([f > 0.3 for f in FRACTIONS])
    assert torch.equal(batch["cloudy"].bool(), cloudy)
    views = trainer.make_views(batch, step=0)
    n_local = cfg.crops.local_crops_number
    for present, n_views in ((views.global_present, 2), (views.local_present, n_local)):
        assert torch.equal(present["s2"], ~cloudy.repeat(n_views))
        assert bool(present["s1"].all())
    assert train(cfg, tmp_path / "trained").final_step == 6


def test_weight_keeps_cloudy_samples_and_scales_the_loss_of_their_views(
    scored_tree: Path, tmp_path: Path
) -> None:
    weighted = ["train.clouds.max_fraction=0.3", "train.clouds.policy=weight"]
    cfg = _config(
        str(scored_tree),
        *weighted,
        "train.clouds.loss_weight=0.25",
        "train.batch_size_per_gpu=6",
        "train.modality_dropout=0",
    )
    dataset = build_dataset(cfg)
    assert len(dataset) == 6 and cloudy_marked(dataset) == 3
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    views = trainer.make_views(collate_samples([dataset[index] for index in range(6)]), step=0)
    clear = torch.tensor([1.0 if f <= 0.3 else 0.25 for f in FRACTIONS])
    assert torch.equal(views.global_weight, clear.repeat(2))
    assert torch.equal(views.local_weight, clear.repeat(cfg.crops.local_crops_number))
    assert views.global_present is None  # unlike sar_only, the student still sees S2
    assert train(cfg, tmp_path / "trained").final_step == 6
