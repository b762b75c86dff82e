"""Sharded checkpoints: commit marker, retention, fallback, async copy, failures, S3."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from torch import nn

from rsdino.data.storage import LocalStore, StorageError, open_store
from rsdino.train.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    checkpoint_name,
    model_and_optimizer_state,
    read_tensors,
)
from rsdino.train.dcp_store import StoreFileSystem

pytest_plugins = ["s3_server"]


def _model(value: float, width: int = 4) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, width)).sum().backward()
    optimizer.step()  # creates exp_avg / exp_avg_sq state
    return model, optimizer


def _info(step: int) -> CheckpointInfo:
    return CheckpointInfo(
        step=step, samples_seen=8 * step, world_size=1, config="a: 1\n", rsdino_version="test"
    )


def _save(checkpointer: Checkpointer, step: int, value: float) -> None:
    model, optimizer = _model(value)
    checkpointer.save(model_and_optimizer_state(model, optimizer), _info(step))
    checkpointer.wait()


def _first_weight(model: nn.Module) -> float:
    return float(model[0].weight[0, 0].detach())


@pytest.mark.parametrize("async_save", [True, False])
def test_saves_commit_keep_newest_and_load_back(tmp_path: Path, async_save: bool) -> None:
    store = CheckpointStore(LocalStore(tmp_path))
    checkpointer = Checkpointer(store, keep=2, async_save=async_save, is_main=True)
    for step, value in ((10, 1.0), (20, 2.0), (30, 3.0)):
        _save(checkpointer, step, value)
    assert store.complete_steps() == [20, 30]
    assert not (tmp_path / checkpoint_name(10)).exists()
    marker = json.loads((tmp_path / checkpoint_name(30) / MARKER).read_text())
    assert marker["step"] == 30 and marker["samples_seen"] == 240

    model, optimizer = _model(0.0)
    info = checkpointer.load_latest(model, optimizer)
    assert info == _info(30)
    saved_model, saved_optimizer = _model(3.0)
    torch.testing.assert_close(model.state_dict(), saved_model.state_dict())
    torch.testing.assert_close(
        optimizer.state_dict()["state"], saved_optimizer.state_dict()["state"]
    )


def test_async_save_writes_the_state_at_the_call_not_later_updates(tmp_path: Path) -> None:
    checkpointer = Checkpointer(
        CheckpointStore(LocalStore(tmp_path)), keep=2, async_save=True, is_main=True
    )
    model, optimizer = _model(1.0)
    checkpointer.save(model_and_optimizer_state(model, optimizer), _info(1))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(99.0)  # training goes on while the write runs
    outcome = checkpointer.wait()
    assert outcome is not None and outcome.committed
    restored, restored_optimizer = _model(0.0)
    checkpointer.load_latest(restored, restored_optimizer)
    assert _first_weight(restored) == _first_weight(_model(1.0)[0])


def test_partial_checkpoint_is_ignored_then_cleaned_up(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStore(tmp_path))
    checkpointer = Checkpointer(store, keep=3, async_save=True, is_main=True)
    _save(checkpointer, 1, 1.0)
    _save(checkpointer, 2, 2.0)
    (tmp_path / checkpoint_name(2) / MARKER).unlink()  # as if killed before the commit
    assert store.complete_steps() == [1]
    model, optimizer = _model(0.0)
    assert checkpointer.load_latest(model, optimizer).step == 1
    assert _first_weight(model) == _first_weight(_model(1.0)[0])
    _save(checkpointer, 3, 3.0)
    assert store.complete_steps() == [1, 3]
    assert not (tmp_path / checkpoint_name(2)).exists()


def test_unreadable_newest_falls_back_and_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(LocalStore(tmp_path))
    checkpointer = Checkpointer(store, keep=3, async_save=False, is_main=True)
    _save(checkpointer, 1, 1.0)
    _save(checkpointer, 2, 2.0)
    shard = tmp_path / checkpoint_name(2) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    model, optimizer = _model(0.0)
    assert checkpointer.load_latest(model, optimizer).step == 1
    assert _first_weight(model) == _first_weight(_model(1.0)[0])
    assert "unreadable" in caplog.text and shard.exists()


def test_all_unreadable_is_an_error_and_empty_is_a_fresh_start(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStore(tmp_path))
    checkpointer = Checkpointer(store, keep=3, async_save=False, is_main=True)
    model, optimizer = _model(0.0)
    assert checkpointer.load_latest(model, optimizer) is None
    _save(checkpointer, 4, 4.0)
    (tmp_path / checkpoint_name(4) / ".metadata").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="none of the 1 complete checkpoints"):
        checkpointer.load_latest(model, optimizer)


class _BrokenWrites(LocalStore):
    """A local store whose data-file writes fail while ``broken`` is set."""

    broken = False

    @contextmanager
    def open_writer(self, key: str) -> Iterator[BinaryIO]:
        if self.broken and key.endswith(".distcp"):
            raise StorageError(f"put {key} failed after 8 attempts (simulated outage)")
        with super().open_writer(key) as writer:
            yield writer


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_save_is_reported_and_keeps_the_previous_checkpoint(
    tmp_path: Path, async_save: bool, caplog: pytest.LogCaptureFixture
) -> None:
    local = _BrokenWrites(tmp_path)
    store = CheckpointStore(local)
    checkpointer = Checkpointer(store, keep=1, async_save=async_save, is_main=True)
    _save(checkpointer, 1, 1.0)
    local.broken = True
    model, optimizer = _model(2.0)
    checkpointer.save(model_and_optimizer_state(model, optimizer), _info(2))
    outcome = checkpointer.wait()
    assert outcome is None or not outcome.committed  # sync saves report from save() itself
    reported = [
        r.message
        for r in caplog.records
        if r.name == "rsdino.train.checkpoint" and r.levelname == "ERROR"
    ]
    assert len(reported) == 1 and "simulated outage" in reported[0]
    assert store.complete_steps() == [1]
    local.broken = False
    _save(checkpointer, 3, 3.0)
    assert store.complete_steps() == [3]


def test_read_tensors_returns_whole_tensors_by_prefix(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStore(tmp_path))
    _save(Checkpointer(store, keep=1, async_save=False, is_main=True), 5, 5.0)
    tensors = read_tensors(store, 5, "model.0.")
    assert sorted(tensors) == ["bias", "weight"]
    assert torch.equal(tensors["weight"], _model(5.0)[0][0].weight.detach())
    with pytest.raises(CheckpointError, match=r"no tensors under 'nothing\.'"):
        read_tensors(store, 5, "nothing.")


def test_store_file_system_reads_any_range(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    (tmp_path / "blob").write_bytes(data)
    with StoreFileSystem(LocalStore(tmp_path)).create_stream("blob", "rb") as stream:
        stream.seek(1000)
        assert stream.read(10) == data[1000:1010]
        stream.seek(-5, 2)
        assert stream.read() == data[-5:]


def test_s3_checkpoint_round_trip_with_multipart_upload(
    bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rsdino.data import storage

    monkeypatch.setattr(storage._MultipartUpload, "part_size", 5 * 1024 * 1024)
    s3 = open_store(f"s3://{bucket}/runs/a", endpoint_url=s3_env, path_style=True)
    store = CheckpointStore(s3)
    checkpointer = Checkpointer(store, keep=1, async_save=True, is_main=True)
    model, optimizer = _model(7.0, width=800)  # ~2.6 MB of weights, 3x with Adam's state
    checkpointer.save(model_and_optimizer_state(model, optimizer), _info(7))
    assert checkpointer.wait().committed
    assert store.complete_steps() == [7]
    assert s3.counters.snapshot()["bytes_written"] > 5 * 1024 * 1024  # went up in parts
    restored, restored_optimizer = _model(0.0, width=800)
    assert checkpointer.load_latest(restored, restored_optimizer).step == 7
    assert _first_weight(restored) == _first_weight(_model(7.0, width=800)[0])
