"""A worker killed mid-training under torchrun: the group restarts and resumes from a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import TINY_OVERRIDES, saved_info, torchrun_train_command

from rsdino.train.checkpoint import MARKER, checkpoint_name

STEPS = 30


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in found.split()]


def test_sigkill_of_one_worker_restarts_the_group_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = torchrun_train_command(
        2,
        run,
        *TINY_OVERRIDES,
        "train.OFFICIAL_EPOCH_LENGTH=3",
        f"optim.epochs={STEPS // 3}",
        "checkpoint.every_steps=5",
        torchrun_args=("--max-restarts=2",),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    first_checkpoint = run / "checkpoints" / checkpoint_name(5) / MARKER
    deadline = time.monotonic() + 120
    while not first_checkpoint.exists():
        assert agent.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    workers = _children(agent.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # a node lost mid-training

    output, _ = agent.communicate(timeout=240)
    text = output.decode(errors="replace")
    assert agent.returncode == 0, text[-3000:]
    assert "resumed from" in text
    final = saved_info(run / "checkpoints", STEPS)
    assert final.step == STEPS
    assert final.samples_seen == STEPS * 2 * 4  # every global batch counted once
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").open()]
    # The first attempt logged steps 1..5 (and maybe a few more before the kill); the restarted
    # group resumed from the step-5 checkpoint and logged 6..STEPS.
    assert steps[:5] == [1, 2, 3, 4, 5]
    assert steps[-(STEPS - 5) :] == list(range(6, STEPS + 1))


def test_sigterm_saves_a_checkpoint_at_the_next_interval_then_exits_for_a_restart(
    tmp_path: Path,
) -> None:
    """Preemption (Kubernetes, Slurm): SIGTERM to torchrun reaches every rank; they agree on a
    step, checkpoint it, exit with 143; the rerun resumes from exactly that step."""
    run = tmp_path / "run"
    long_run = (*TINY_OVERRIDES, "optim.epochs=100", "checkpoint.every_steps=1000")
    command = torchrun_train_command(2, run, *long_run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    log_path = run / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while not log_path.exists() or len(log_path.read_text().splitlines()) < 3:
        assert agent.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    output, _ = agent.communicate(timeout=120)
    text = output.decode(errors="replace")
    assert agent.returncode == 143, "a preempted job must exit for a restart, not look finished"
    assert "stopped on SIGTERM after step" in text, text[-3000:]

    steps = [json.loads(line)["step"] for line in log_path.open()]
    stopped_at = steps[-1]
    info = saved_info(run / "checkpoints", stopped_at)  # complete: its marker reads
    assert info.samples_seen == stopped_at * 2 * 4 and info.world_size == 2

    rerun = subprocess.run(
        torchrun_train_command(1, run, *TINY_OVERRIDES, "optim.epochs=2"),
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from file://{run / 'checkpoints'}/step_{stopped_at:08d}" in rerun.stdout
