"""Checkpoints to a loopback S3 server under faults, with two real ranks under torchrun.

(b) a worker SIGKILLed while an async checkpoint is being uploaded: the partial checkpoint is
never loaded, the group resumes from the previous complete one and finishes;
(c) the checkpoint destination answers errors for a while: training goes on, the failed saves
are reported, and no complete checkpoint is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, saved_info, saved_tensors, torchrun_train_command
from s3_server import FaultyProxy

from rsdino.train.checkpoint import MARKER, checkpoint_name

pytest_plugins = ["s3_server"]
STEPS = 24


@pytest.fixture
def checkpoint_uri(bucket: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the runs checkpoint; the test process reads it back straight from moto."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("RSDINO_S3_PATH_STYLE", "1")
    return f"s3://{bucket}/ckpt"


def _start(run: Path, proxy: FaultyProxy, uri: str, *overrides: str) -> subprocess.Popen:
    command = torchrun_train_command(
        2,
        run,
        *TINY_OVERRIDES,
        f"checkpoint.dir={uri}",
        f"train.storage.endpoint_url={proxy.url}",
        "train.storage.path_style=true",
        *overrides,
        torchrun_args=("--max-restarts=1",),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _wait_for_request(
    proxy: FaultyProxy, agent: subprocess.Popen, method: str, fragment: str, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while not any(m == method and fragment in path for m, path in list(proxy.paths)):
        assert agent.poll() is None, agent.communicate()[0].decode(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no {method} of {fragment} reached the proxy"
        time.sleep(0.02)


def _finish(agent: subprocess.Popen) -> str:
    output, _ = agent.communicate(timeout=240)
    text = output.decode(errors="replace")
    assert agent.returncode == 0, text[-4000:]
    return text


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in found.split()]


def _assert_loadable_and_finite(uri: str, steps: list[int]) -> None:
    for step in steps:
        tensors = saved_tensors(uri, step).values()
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), step


def test_sigkill_during_async_upload_resumes_from_previous_checkpoint(
    tmp_path: Path, moto_endpoint: str, checkpoint_uri: str
) -> None:
    uri = checkpoint_uri
    with FaultyProxy(moto_endpoint, methods=("PUT", "POST", "GET", "HEAD", "DELETE")) as proxy:
        proxy.path_filter, proxy.delay = checkpoint_name(4), 0.3  # a slow upload of step 4
        agent = _start(tmp_path / "run", proxy, uri)
        _wait_for_request(proxy, agent, "PUT", f"{checkpoint_name(4)}/__")
        workers = _children(agent.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)  # rank 0, the one that would commit step 4
        proxy.delay = 0.0
        text = _finish(agent)

    assert f"resumed from {uri}/{checkpoint_name(2)}" in text
    assert saved_info(uri, 6).samples_seen == 6 * 2 * 4  # every global batch counted once
    _assert_loadable_and_finite(uri, [2, 4, 6])
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").open()]
    assert steps[-4:] == [3, 4, 5, 6]  # the restarted group redid steps 3..6


def test_storage_outage_during_saves_is_reported_and_training_goes_on(
    tmp_path: Path, moto_endpoint: str, checkpoint_uri: str
) -> None:
    uri = checkpoint_uri
    with FaultyProxy(moto_endpoint, methods=("PUT", "POST", "GET", "HEAD", "DELETE")) as proxy:
        proxy.path_filter = "/ckpt/"
        agent = _start(
            tmp_path / "run",
            proxy,
            uri,
            f"optim.epochs={STEPS // 3}",  # a checkpoint every 2 steps
            "train.storage.max_attempts=2",  # give up quickly, so some saves fail outright
        )
        _wait_for_request(proxy, agent, "PUT", f"{checkpoint_name(2)}/{MARKER}")
        # The next 8 checkpoint requests fail: some are retried successfully, some saves fail.
        proxy.outage_left, proxy.outage = 8, "503"
        text = _finish(agent)

    assert proxy.injected["503"] == 8
    assert "was not saved" in text and "training goes on" in text
    assert "Traceback" not in text
    committed = [
        int(line.split("step_")[1][:8]) for line in text.splitlines() if " complete (" in line
    ]
    assert committed[0] == 2 and committed[-1] == STEPS
    assert len(committed) < STEPS // 2, "some saves should have failed"
    assert saved_info(uri, STEPS).samples_seen == STEPS * 2 * 4
    _assert_loadable_and_finite(uri, [STEPS])
