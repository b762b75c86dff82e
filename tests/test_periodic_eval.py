"""kNN of the teacher during training: the logged figure equals an offline evaluation of the saved
teacher, on one rank and gathered from two; turning it on changes no training draw."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, saved_tensors, tiny_config, torchrun_train_command
from source_fixtures import write_eurosat

from rsdino.config.loader import ConfigError, load_config
from rsdino.eval.features import extract_features
from rsdino.eval.knn import knn_classify
from rsdino.eval.model import load_eval_model
from rsdino.train.loop import train
from rsdino.train.periodic_eval import labelled_splits, rank_block

# 6 steps; evaluations at 4 and at the last step. Odd split sizes make the 2-rank blocks padded.
EVAL = ["evaluation.eval_period_iterations=4", "evaluation.synthetic_counts=[33,17]"]


def eval_records(run: Path) -> list[dict]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "eval" in record]


def offline_knn(run: Path, step: int) -> dict[str, float]:
    """What `rsdino eval knn` would compute on the same held-out tiles from the saved teacher."""
    model = load_eval_model(str(run), step=step)
    splits = labelled_splits(model.cfg)
    normalizers = model.normalizers()
    bank = extract_features(model.encoder, splits.train, normalizers, progress=False)
    queries = extract_features(model.encoder, splits.val, normalizers, progress=False)
    accuracy = knn_classify(
        bank["cls"],
        bank["label"],
        queries["cls"],
        queries["label"],
        ks=tuple(model.cfg.evaluation.ks),
        temperature=model.cfg.evaluation.temperature,
        num_classes=len(splits.class_names),
    )
    return {str(k): value for k, value in accuracy.items()}


def assert_matches_offline(run: Path, record: dict) -> None:
    # One query's worth of slack: a different batch composition may reorder float sums.
    tolerance = 1 / record["eval"]["queries"] + 1e-9
    assert record["eval"]["knn"] == pytest.approx(offline_knn(run, record["step"]), abs=tolerance)


@pytest.mark.parametrize(("n_samples", "world_size"), [(10, 3), (17, 2), (4, 4), (3, 1)])
def test_rank_blocks_cover_the_split_in_order_with_equal_lengths(
    n_samples: int, world_size: int
) -> None:
    blocks = [rank_block(n_samples, rank, world_size) for rank in range(world_size)]
    assert len({len(block) for block in blocks}) == 1
    assert [i for block in blocks for i in block][:n_samples] == list(range(n_samples))


def test_periodic_knn_is_logged_matches_offline_and_changes_no_training_draw(
    tmp_path: Path,
) -> None:
    with_eval, without = tmp_path / "eval", tmp_path / "plain"
    train(tiny_config(*EVAL), with_eval, resume=False)
    train(tiny_config(), without, resume=False)

    records = eval_records(with_eval)
    assert [record["step"] for record in records] == [4, 6]
    for record in records:
        assert set(record["eval"]["knn"]) == {"10", "20"}
        assert record["eval"]["bank"] == 33 and record["eval"]["queries"] == 17
        assert record["eval"]["dataset"] == "synthetic" and record["eval"]["mode"] == "s2"
    assert_matches_offline(with_eval, records[-1])

    assert not eval_records(without)
    losses = [json.loads(line) for line in (with_eval / "train_log.jsonl").open()]
    plain = [json.loads(line) for line in (without / "train_log.jsonl").open()]
    assert [r["total"] for r in losses if "total" in r] == [r["total"] for r in plain]
    evaluated, trained = (
        saved_tensors(with_eval / "checkpoints", 6),
        saved_tensors(without / "checkpoints", 6),
    )
    assert all(torch.equal(evaluated[key], trained[key]) for key in trained)


def test_two_ranks_gather_their_features_into_the_same_evaluation(tmp_path: Path) -> None:
    run = tmp_path / "two"
    command = torchrun_train_command(2, run, *TINY_OVERRIDES, *EVAL, "train.batch_size_per_gpu=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = eval_records(run)
    assert [record["step"] for record in records] == [4, 6]  # rank 0 alone writes them
    assert records[-1]["eval"]["queries"] == 17  # the padding of the blocks was dropped
    assert_matches_offline(run, records[-1])


def test_periodic_eval_on_eurosat_folders_during_training(tmp_path: Path) -> None:
    write_eurosat(tmp_path / "eurosat", {"Forest": 6, "River": 6, "SeaLake": 6}, size=16)
    run = tmp_path / "run"
    overrides = [
        "evaluation.eval_period_iterations=6",
        "evaluation.dataset=eurosat",
        f"evaluation.uri={tmp_path / 'eurosat'}",
        "evaluation.val_fraction=0.5",
        "evaluation.tile_size=16",
    ]
    train(tiny_config(*overrides), run, resume=False)
    (record,) = eval_records(run)
    assert record["eval"]["dataset"] == "scene" and record["eval"]["queries"] == 9
    assert_matches_offline(run, record)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.dataset.source=sen12ms", "train.dataset.uri=/data"],
            r"evaluation.dataset=synthetic .* needs train.dataset.source=synthetic",
        ),
        (["evaluation.dataset=eurosat"], r"evaluation.uri is needed by evaluation.dataset=eurosat"),
        (["evaluation.uri=/data"], r"evaluation.uri does not apply to evaluation.dataset=synth"),
        (["evaluation.dataset=bigearthnet"], r"evaluation.dataset='bigearthnet' is not one of"),
        (["evaluation.ks=[0]"], r"evaluation.ks=\[0\] must list neighbour counts >= 1"),
    ],
)
def test_bad_evaluation_keys_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", ["evaluation.eval_period_iterations=10", *overrides])


def test_a_missing_eurosat_folder_fails_before_the_first_step(tmp_path: Path) -> None:
    cfg = tiny_config(
        "evaluation.eval_period_iterations=2",
        "evaluation.dataset=eurosat",
        f"evaluation.uri={tmp_path / 'nowhere'}",
    )
    with pytest.raises(Exception, match="nowhere") as caught:
        train(cfg, tmp_path / "run", resume=False)
    assert not (tmp_path / "run" / "checkpoints").exists() or not list(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
    assert getattr(caught.value, "exit_code", None) is not None
