"""Exit codes and stop signals: what schedulers (Kubernetes ExitCode, Slurm) act on.

Real processes throughout: a signal to the whole process group (as Slurm, ``timeout`` and a
terminal's Ctrl-C send it) and to torchrun alone (as Kubernetes sends it to PID 1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES, saved_info, torchrun_train_command, train_command
from source_fixtures import write_sen12ms_tree
from torch.distributed.elastic.multiprocessing import ProcessFailure

from rsdino.data.sources.decode import CorruptFileError
from rsdino.error_boundary import run_reporting_errors
from rsdino.errors import ExitCode
from rsdino.launch import job_exit_code

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LONG_RUN = (*TINY_OVERRIDES, "optim.epochs=100", "checkpoint.every_steps=1000")


def _wait_for_log_lines(process: subprocess.Popen, log_path: Path, lines: int) -> None:
    deadline = time.monotonic() + 120
    while not log_path.exists() or len(log_path.read_text().splitlines()) < lines:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_whole_process_group_checkpoints_and_exits_for_a_restart(
    tmp_path: Path, signum: int, code: int
) -> None:
    """DataLoader workers get the signal too; they must not die and take the run with them."""
    run = tmp_path / "run"
    process = subprocess.Popen(
        train_command(run, *LONG_RUN, "train.num_workers=2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,  # its own process group, as under Slurm or a terminal
    )
    _wait_for_log_lines(process, run / "train_log.jsonl", 3)
    os.killpg(process.pid, signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == code, output[-3000:]
    assert "Traceback" not in output and "DataLoader worker" not in output, output[-3000:]
    name = signal.Signals(signum).name
    assert f"rsdino: stopped on {name} after step" in output

    stopped_at = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])["step"]
    assert saved_info(run / "checkpoints", stopped_at).samples_seen == stopped_at * 4
    rerun = subprocess.run(
        train_command(run, *TINY_OVERRIDES, f"optim.epochs={stopped_at // 3 + 1}"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"checkpoints/step_{stopped_at:08d} (step {stopped_at}," in rerun.stdout


def test_the_launcher_rejects_a_bad_config_before_the_rendezvous(tmp_path: Path) -> None:
    """A bad config fails the same way on every restart and on every pod: each launcher checks it
    itself and exits 2 without starting workers, so no pod sees its peer vanish instead."""
    command = torchrun_train_command(
        2, tmp_path / "run", "optim.nope=1", torchrun_args=("--max-restarts=3",)
    )
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == ExitCode.CONFIG, output[-3000:]
    assert output.count("rsdino: config error:") == 1, output[-3000:]
    assert "optim.nope" in output
    assert "local_rank" not in output and "Traceback" not in output  # no worker was started
    assert not (tmp_path / "run").exists()


def test_the_launcher_stops_restarting_on_a_permanent_error(tmp_path: Path) -> None:
    """An error only a worker can find (here: the dataset folder does not exist) fails the same
    way on every restart: its code at once, not after 3 restarts."""
    command = torchrun_train_command(
        2,
        tmp_path / "run",
        "train.dataset.source=geotiff",
        f"train.dataset.uri={tmp_path / 'no-such-folder'}",
        torchrun_args=("--max-restarts=3",),
    )
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == ExitCode.STORAGE, output[-3000:]
    assert output.count("a worker exited with permanent code 6: not restarting") == 1
    assert "no-such-folder" in output
    assert "Traceback" not in output


def test_the_launcher_reports_a_killed_worker_as_retryable(tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = torchrun_train_command(2, run, *LONG_RUN, torchrun_args=("--max-restarts=0",))
    agent = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )
    _wait_for_log_lines(agent, run / "train_log.jsonl", 2)
    workers = subprocess.run(
        ["pgrep", "-P", str(agent.pid)], capture_output=True, text=True
    ).stdout.split()
    os.kill(int(workers[0]), signal.SIGKILL)
    output, _ = agent.communicate(timeout=120)
    assert agent.returncode >= 128, output[-3000:]
    assert "rsdino-torchrun: exiting with" in output


def _failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
    failure = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file="")
    failure.timestamp = timestamp
    return failure


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([(3, 2), (1, 1)], 3),  # rank 1 crashed first because rank 0 hit bad data: data wins
        ([(1, 1), (-9, 2)], 1),  # an unexplained crash stays the cause
        ([(-9, 1), (1, 2)], 137),  # killed first; the peer's crash only followed it
        ([(143, 1), (143, 1)], 143),
    ],
)
def test_the_job_code_is_the_cause_not_the_peers_reaction(
    codes: list[tuple[int, int]], expected: int
) -> None:
    failures = {rank: _failure(rank, code, at) for rank, (code, at) in enumerate(codes)}
    assert job_exit_code(failures) == expected


def test_the_boundary_gives_one_line_and_the_error_s_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def bad_tile() -> int:
        raise CorruptFileError("s2/tile_7.tif", "cannot decode", "replace the file")

    def missing_path() -> int:
        raise FileNotFoundError(2, "No such file or directory", "/no/such/stats.json")

    def second_ctrl_c() -> int:
        raise KeyboardInterrupt

    assert run_reporting_errors(bad_tile) == ExitCode.DATA
    assert run_reporting_errors(missing_path) == ExitCode.ERROR
    assert run_reporting_errors(second_ctrl_c) == ExitCode.SIGINT
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "rsdino: error: s2/tile_7.tif: cannot decode; replace the file",
        "rsdino: error: No such file or directory: /no/such/stats.json; check the path and "
        "its permissions",
        "rsdino: interrupted: stopped at once by Ctrl-C; no checkpoint was written",
    ]


def test_a_bug_still_shows_its_traceback() -> None:
    def bug() -> int:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_reporting_errors(bug)


def test_bad_data_under_fail_in_a_loader_worker_is_one_line_and_exit_3(tmp_path: Path) -> None:
    """The worker's CorruptFileError reaches the CLI as itself, not as DataLoader's
    89-line RuntimeError("Caught CorruptFileError in DataLoader worker process 0")."""
    files = write_sen12ms_tree(tmp_path / "tree")
    corrupt = sorted(key for key in files if "/S2/" in key)[0]
    (tmp_path / "tree" / corrupt).write_bytes(b"not a tiff")
    overrides = (
        *TINY_OVERRIDES,
        "train.dataset.source=sen12ms",
        f"train.dataset.uri={tmp_path / 'tree'}",
        "train.dataset.on_error=fail",
        "train.batch_size_per_gpu=2",
        "train.num_workers=2",
    )
    result = subprocess.run(
        train_command(tmp_path / "run", *overrides),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == ExitCode.DATA, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.splitlines() if line.startswith("rsdino: error: ")
    ], result.stderr[-3000:]
    assert corrupt in result.stderr and "Traceback" not in result.stderr
