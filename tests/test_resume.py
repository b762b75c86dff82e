"""Resuming a run: config changes, the run log, going back to an earlier step, divergence."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES, tiny_multimodal_config
from omegaconf import OmegaConf

from rsdino.cli import main
from rsdino.data.storage import LocalStore
from rsdino.errors import ExitCode
from rsdino.train.checkpoint import CheckpointStore, checkpoint_name
from rsdino.train.divergence import DivergenceGuard
from rsdino.train.loop import train


def _train(run: Path, *extra: str) -> int:
    argv = ["train", "--config", "quickstart", "--output-dir", str(run), *TINY_OVERRIDES]
    return main([*argv, *extra])


def _logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").open()]


def test_a_model_changing_key_on_resume_is_named_and_nothing_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert _train(run) == 0
    config_before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert _train(run, "student.embed_dim=64", "optim.epochs=3") == ExitCode.CHECKPOINT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the config changed since" in err and "student.embed_dim 32 -> 64" in err
    assert "--no-resume" in err and "unreadable" not in err
    assert (run / "config.yaml").read_text() == config_before  # a failed start writes nothing


def test_other_changes_on_resume_are_logged_and_the_log_keeps_one_record_per_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    assert _train(run) == 0  # 6 steps, checkpoints at 2, 4, 6
    store = LocalStore(run / "checkpoints")
    for key in store.list(checkpoint_name(6)):  # as if the job died before step 6's save
        store.delete(key)
    caplog.set_level(logging.INFO, logger="rsdino")
    assert _train(run, "optim.epochs=3") == 0
    assert "resuming with changed settings: optim.epochs 2 -> 3" in caplog.text
    assert _logged_steps(run) == list(range(1, 10))  # 5 and 6 once, from the second run
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.optim.epochs == 3


def test_no_resume_starts_a_fresh_log_and_keeps_the_old_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(run) == 0
    assert _train(run, "--no-resume") == 0
    assert _logged_steps(run) == list(range(1, 7))
    (old,) = run.glob("train_log.old-*.jsonl")
    assert len(old.read_text().splitlines()) == 6


def test_resume_from_an_earlier_step_keeps_the_later_checkpoints_aside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(run) == 0
    assert _train(run, "--resume-from-step", "2") == 0
    (aside,) = run.glob("checkpoints.after-step-2-*")
    assert sorted(path.name for path in aside.iterdir()) == [checkpoint_name(4), checkpoint_name(6)]
    assert CheckpointStore(LocalStore(run / "checkpoints")).complete_steps() == [2, 4, 6]
    assert _logged_steps(run) == list(range(1, 7))


def test_resume_from_a_step_without_a_checkpoint_names_the_ones_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert _train(run) == 0
    capsys.readouterr()
    assert _train(run, "--resume-from-step", "3") == ExitCode.CHECKPOINT
    err = capsys.readouterr().err
    assert "step_00000003 is not a complete checkpoint" in err and "2, 4, 6" in err


def test_the_good_checkpoint_is_the_last_one_saved_before_the_loss_spiked() -> None:
    guard = DivergenceGuard(spike_factor=10.0)
    for step, loss in enumerate([9.0, 8.0, 7.5, 7.0, 6.8, 6.5], start=1):
        guard.observe(step, loss)
    guard.saving(6)
    guard.committed(6)
    assert guard.good_step == 6
    guard.observe(7, 5e29)  # the weights blew up
    guard.saving(8)
    guard.committed(8)
    guard.observe(9, math.nan)
    assert guard.good_step == 6
    guard.observe(10, 6.0)  # came back down: later checkpoints count again
    guard.saving(10)
    guard.committed(10)
    assert guard.good_step == 10


def test_retention_keeps_the_protected_good_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStore(tmp_path))
    for step in (2, 4, 6, 8):
        (tmp_path / checkpoint_name(step)).mkdir()
        (tmp_path / checkpoint_name(step) / "rsdino-checkpoint.json").write_text("{}")
    store.prune(keep=2, protect=2)
    assert store.complete_steps() == [2, 6, 8]


def test_the_start_lines_name_both_encoders_and_the_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rsdino")
    train(tiny_multimodal_config("optim.epochs=1"), tmp_path / "run")
    assert "(S1, 2 bands) + " in caplog.text and "(S2, 13 bands), linear fusion" in caplog.text
    assert "data: built-in synthetic tiles: 64 samples" in caplog.text
