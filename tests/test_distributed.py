"""Several real processes (gloo on CPU) under torchrun: FSDP2 training and world-size changes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, saved_info, saved_tensors, torchrun_train_command

from rsdino.train.checkpoint import checkpoint_name

# Same global batch (4) on one or two ranks. KoLeo is computed per rank (as in DINOv2) and
# stochastic depth draws per rank, so both are off to make the two runs comparable.
EXACT = [*TINY_OVERRIDES, "dino.koleo_loss_weight=0", "student.drop_path_rate=0"]


def torchrun(n_procs: int, output_dir: Path, *overrides: str) -> None:
    command = torchrun_train_command(n_procs, output_dir, *overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["total"] for line in (run / "train_log.jsonl").open()]


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path: Path) -> None:
    torchrun(1, tmp_path / "one", *EXACT, "train.batch_size_per_gpu=4")
    torchrun(2, tmp_path / "two", *EXACT, "train.batch_size_per_gpu=2")
    # Tolerance: FSDP averages gradients with a reduce-scatter, a different float summation order
    # than one process's backward; over 6 steps the losses agree to about 1e-5.
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-3)
    one, two = tmp_path / "one" / "checkpoints", tmp_path / "two" / "checkpoints"
    assert saved_info(one, 6).samples_seen == saved_info(two, 6).samples_seen == 24
    assert saved_info(two, 6).world_size == 2
    two_model = saved_tensors(two, 6)  # sharded over 2 ranks, read back whole
    for key, value in saved_tensors(one, 6).items():
        assert torch.allclose(value, two_model[key], atol=1e-3), key


@pytest.mark.parametrize("new_world_size", [1, 3])
def test_checkpoint_from_two_ranks_resumes_on_another_world_size(
    tmp_path: Path, new_world_size: int
) -> None:
    run = tmp_path / "run"
    torchrun(2, run, *TINY_OVERRIDES)
    for step in (4, 6):
        shutil.rmtree(run / "checkpoints" / checkpoint_name(step))
    torchrun(new_world_size, run, *TINY_OVERRIDES)
    final = saved_info(run / "checkpoints", 6)
    # 2 steps at 2 ranks x 4 samples, then 4 steps at new_world_size ranks x 4 samples.
    assert final.samples_seen == 2 * 2 * 4 + 4 * new_world_size * 4
    assert final.world_size == new_world_size
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(run))


def _elastic_agent(
    output_dir: Path, port: int, *overrides: str, rdzv_conf: tuple[str, ...] = ()
) -> subprocess.Popen:
    """One "node" of an elastic job: torchrun with --nnodes=1:2 and c10d rendezvous."""
    command = torchrun_train_command(
        1,
        output_dir,
        *TINY_OVERRIDES,
        *overrides,
        torchrun_args=(
            "--nnodes=1:2",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id=elastic-{port}",
            *rdzv_conf,
        ),
    )
    command.remove("--standalone")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def test_elastic_job_trains_on_two_nodes_then_resumes_on_one(tmp_path: Path) -> None:
    """--nnodes=1:2: two agents form one group; later one agent alone resumes the run."""
    run = tmp_path / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agents = [_elastic_agent(run, port, "optim.epochs=1") for _ in range(2)]
    for agent in agents:
        output, _ = agent.communicate(timeout=240)
        assert agent.returncode == 0, output.decode(errors="replace")[-3000:]
    assert saved_info(run / "checkpoints", 3).world_size == 2

    # Fewer than the maximum of nodes: rendezvous waits last_call_timeout for more (30 s by
    # default), then starts with the one it has.
    alone = _elastic_agent(
        run, port + 1, "optim.epochs=2", rdzv_conf=("--rdzv-conf=last_call_timeout=2",)
    )
    output, _ = alone.communicate(timeout=240)
    assert alone.returncode == 0, output.decode(errors="replace")[-3000:]
    final = saved_info(run / "checkpoints", 6)
    assert final.world_size == 1
    assert final.samples_seen == 3 * 2 * 4 + 3 * 1 * 4  # 3 steps on 2 nodes, 3 on one
