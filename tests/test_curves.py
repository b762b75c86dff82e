"""Loss curves where people look at them: TensorBoard event files and an offline wandb run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rsdino.cli import main
from rsdino.errors import ExitCode
from rsdino.train import curves


def _quickstart(run: Path, *extra: str) -> int:
    argv = ["train", "--config", "quickstart", "--output-dir", str(run), *TINY_OVERRIDES]
    return main([*argv, *extra])


def test_a_quickstart_writes_tensorboard_curves_that_tensorboard_reads_back(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    assert _quickstart(run, "curves.tensorboard=auto") == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss/total", "loss/dino_global", "schedule/lr"} <= set(events.Tags()["scalars"])
    total = events.Scalars("loss/total")
    assert [point.step for point in total] == list(range(1, 7))
    log_lines = (run / "train_log.jsonl").read_text().splitlines()
    logged = [json.loads(line)["total"] for line in log_lines]
    assert [point.value for point in total] == pytest.approx(logged, rel=1e-6)


def test_required_curves_without_their_package_fail_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(curves, "_installed", lambda package: False)
    assert _quickstart(tmp_path / "run", "curves.tensorboard=true") == ExitCode.CONFIG
    err = capsys.readouterr().err.strip()
    assert err.startswith("rsdino: config error: curves.tensorboard=true but the tensorboard")


def test_wandb_offline_logs_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert _quickstart(run, "curves.wandb=true") == 0
    (offline,) = (run / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    # The run's protobuf log, synced later by `wandb sync`, is written by wandb-core, a process
    # of its own: give it time to catch up (one clean-clone run once read only the file header
    # right after finish()), and show wandb's own log if the rows never come.
    deadline = time.monotonic() + 30
    while (logged := records.read_bytes()).count(b"dino_global") < 6:
        if time.monotonic() > deadline:
            internal = offline / "logs" / "debug-internal.log"
            tail = internal.read_text()[-3000:] if internal.exists() else "(no debug-internal.log)"
            pytest.fail(f"{records} holds {len(logged)} bytes, not 6 history rows:\n{tail}")
        time.sleep(0.2)
    assert b"teacher_temp" in logged
