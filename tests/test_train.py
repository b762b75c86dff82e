"""End-to-end training on CPU: outputs, exact resume, and failures that keep what was written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import saved_info, saved_tensors, tiny_config

from rsdino.cli import main
from rsdino.errors import ExitCode
from rsdino.train.checkpoint import MARKER, checkpoint_name
from rsdino.train.loop import TrainingDivergedError, train


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 6-step run shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = train(tiny_config(), out)
    assert result.final_step == 6
    return out


def test_run_writes_config_log_and_checkpoints(finished_run: Path) -> None:
    assert (finished_run / "config.yaml").read_text().startswith("dino:")
    names = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    assert names == [checkpoint_name(2), checkpoint_name(4), checkpoint_name(6)]
    records = [
        json.loads(line) for line in (finished_run / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        for name in ("total", "dino_global", "dino_local", "koleo", "lr", "teacher_temp"):
            assert torch.isfinite(torch.tensor(record[name])), name
    assert saved_info(finished_run / "checkpoints", 6).samples_seen == 6 * 4
    model = saved_tensors(finished_run / "checkpoints", 6)
    assert "dino_loss.center" in model
    assert any(k.startswith("teacher.encoder.backbones.s2.blocks.") for k in model)
    assert any(k.endswith(".exp_avg") for k in saved_tensors(finished_run / "checkpoints", 6, ""))


def test_resume_reaches_bitwise_identical_weights(finished_run: Path, tmp_path: Path) -> None:
    """Stopped after the step-2 checkpoint and resumed == never stopped (bitwise on CPU)."""
    resumed = tmp_path / "resumed"
    shutil.copytree(finished_run, resumed)
    for step in (4, 6):
        shutil.rmtree(resumed / "checkpoints" / checkpoint_name(step))
    result = train(tiny_config(), resumed)
    assert result.resumed_from == 2
    assert result.final_step == 6
    # Model, centres and optimiser moments alike.
    expected = saved_tensors(finished_run / "checkpoints", 6, "")
    _assert_states_equal(expected, saved_tensors(resumed / "checkpoints", 6, ""))


def test_corrupted_latest_checkpoint_falls_back_with_warning(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shard = run / "checkpoints" / checkpoint_name(6) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])  # a file cut short after the commit
    with caplog.at_level(logging.WARNING):
        result = train(tiny_config(), run)
    assert result.resumed_from == 4
    assert "unreadable" in caplog.text and checkpoint_name(6) in caplog.text
    # The unreadable checkpoint was left alone; the rerun rewrote step 6 from step 4.
    _assert_states_equal(
        saved_tensors(finished_run / "checkpoints", 6), saved_tensors(run / "checkpoints", 6)
    )


def test_no_resume_starts_fresh_and_keeps_old_checkpoints(
    finished_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    result = train(tiny_config("optim.epochs=1"), run, resume=False)
    assert result.resumed_from is None
    assert result.final_step == 3
    archived = list(run.glob("checkpoints.old-*"))
    assert len(archived) == 1
    assert (archived[0] / checkpoint_name(6) / MARKER).is_file()


def test_no_resume_refuses_a_checkpoint_dir_that_holds_checkpoints(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import TINY_OVERRIDES

    before = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    code = main(
        [
            "train",
            "--config",
            "quickstart",
            "--output-dir",
            str(tmp_path / "fresh"),
            "--no-resume",
            *TINY_OVERRIDES,
            f"checkpoint.dir={finished_run / 'checkpoints'}",
        ]
    )
    assert code == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_config("optim.base_lr=1e30", "optim.clip_grad=0", "checkpoint.every_steps=1")
    with pytest.raises(TrainingDivergedError, match=r"non-finite .*last good checkpoint"):
        train(cfg, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    saved = sorted(checkpoints.glob(f"step_*/{MARKER}"))
    assert saved, "the finite steps before the divergence were checkpointed"
    for marker in saved:
        step = int(marker.parent.name.removeprefix("step_"))
        tensors = saved_tensors(checkpoints, step).values()
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_cli_rejects_output_dir_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "a_file"
    target.write_text("not a directory")
    code = main(["train", "--config", "quickstart", "--output-dir", str(target)])
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.CHECKPOINT
    assert len(err.splitlines()) == 1
    assert "is a file" in err and "--output-dir" in err
    assert target.read_text() == "not a directory"


def test_cli_rejects_unreadable_only_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "run" / "checkpoints" / checkpoint_name(2)
    garbage.mkdir(parents=True)
    (garbage / MARKER).write_bytes(b"garbage")
    from conftest import TINY_OVERRIDES

    code = main(
        ["train", "--config", "quickstart", "--output-dir", str(tmp_path / "run"), *TINY_OVERRIDES]
    )
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.CHECKPOINT
    assert "none of the 1 complete checkpoints" in err and "--no-resume" in err
    assert (garbage / MARKER).read_bytes() == b"garbage"
