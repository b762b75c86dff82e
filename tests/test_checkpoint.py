"""Checkpoint files are complete or absent; retention; fallback past unreadable files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsdino.train.checkpoint import CheckpointError, CheckpointManager, checkpoint_name


def _state(step: int) -> dict:
    return {
        "step": step,
        "samples_seen": 4 * step,
        "model": {"w": torch.full((3,), float(step))},
        "optimizer": {},
    }


def test_save_keeps_newest_k(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        manager.save(step, _state(step))
    assert [step for step, _ in manager.complete_checkpoints()] == [20, 30]
    loaded = manager.load_latest()
    assert loaded is not None and loaded.step == 30
    assert torch.equal(loaded.state["model"]["w"], torch.full((3,), 30.0))


def test_crash_during_save_leaves_previous_checkpoint_as_latest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, _state(1))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("simulated crash mid-write")

    with pytest.raises(RuntimeError, match="simulated crash"):
        manager.save(2, {**_state(2), "extra": Unpicklable()})
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(1)]
    loaded = manager.load_latest()
    assert loaded is not None and loaded.step == 1


def test_stray_temporary_file_is_ignored(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(5, _state(5))
    (tmp_path / f".{checkpoint_name(6)}.tmp-999").write_bytes(b"partial")
    loaded = manager.load_latest()
    assert loaded is not None and loaded.step == 5


def test_unreadable_newest_falls_back_and_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, _state(1))
    manager.save(2, _state(2))
    newest = tmp_path / checkpoint_name(2)
    newest.write_bytes(newest.read_bytes()[:50])
    loaded = manager.load_latest()
    assert loaded is not None and loaded.step == 1
    assert "unreadable" in caplog.text
    assert newest.exists()


def test_checkpoint_without_required_entries_is_skipped(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, _state(1))
    torch.save({"step": 2}, tmp_path / checkpoint_name(2))
    loaded = manager.load_latest()
    assert loaded is not None and loaded.step == 1


def test_all_unreadable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / checkpoint_name(3)).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        CheckpointManager(tmp_path, keep=3).load_latest()


def test_empty_directory_means_fresh_start(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path / "missing", keep=1).load_latest() is None
