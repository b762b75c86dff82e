"""The Slurm scripts, run for real against stand-ins for srun and scontrol (no Slurm here).

The fake srun starts its command once per task on this machine with SLURM_PROCID/SLURM_LOCALID set,
as srun does on a single node; the fake scontrol expands comma lists of hosts.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES, saved_info

SLURM_DIR = Path(__file__).resolve().parents[1] / "scripts" / "slurm"
SUBMIT = SLURM_DIR / "submit.sh"
TRAIN_SBATCH = SLURM_DIR / "train.sbatch"

FAKE_SRUN = """#!/usr/bin/env bash
# srun on one node: start the command once per task, fail if any task failed.
ntasks="$SLURM_NTASKS"
options=()
while [[ "$1" == --* ]]; do
  case "$1" in --ntasks=*) ntasks="${1#--ntasks=}" ;; esac
  options+=("$1")
  shift
done
printf '%s\\n' "${options[@]}" > "$RECORD_DIR/srun_options"
pids=()
for ((task = 0; task < ntasks; task++)); do
  SLURM_NTASKS="$ntasks" SLURM_PROCID="$task" SLURM_LOCALID="$task" "$@" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit "$status"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# `scontrol show hostnames A,B`: one host per line (comma lists only, no ranges like node[1-4]).
[[ "$1 $2" == "show hostnames" ]] || exit 1
tr ',' '\\n' <<< "$3"
"""

# Stands in for rsdino or torchrun: records what one task was started with.
RECORDER = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path

keys = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "SLURM_NTASKS")
record = {{"argv": sys.argv[1:], **{{key: os.environ.get(key) for key in keys}}}}
name = f"{{Path(sys.argv[0]).name}}.{{os.environ['SLURM_PROCID']}}.json"
Path(os.environ["RECORD_DIR"], name).write_text(json.dumps(record))
"""

# The shared tiny run, one epoch of 3 steps with a checkpoint at the end (later keys win).
TINY_RUN = ["--config", "quickstart", *TINY_OVERRIDES, "optim.epochs=1", "checkpoint.every_steps=3"]


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def fake_slurm_bin(tmp_path: Path, *, scontrol: bool = True, recorders: bool = False) -> Path:
    """A folder to put first on PATH: fake srun, optionally fake scontrol, rsdino and torchrun."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "srun", FAKE_SRUN)
    if scontrol:
        write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    if recorders:
        write_executable(bin_dir / "rsdino", RECORDER)
        write_executable(bin_dir / "rsdino-torchrun", RECORDER)
    return bin_dir


def run_train_sbatch(
    tmp_path: Path, bin_dir: Path, args: list[str], path_tail: str | None = None, **slurm: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run train.sbatch as the batch step would, in ``tmp_path``; returns the run and RECORD_DIR."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{path_tail or os.environ['PATH']}",
        RECORD_DIR=str(record_dir),
    )
    env.update(
        {
            "SLURM_JOB_ID": "123456",
            "SLURM_NTASKS": "2",
            "SLURM_NNODES": "1",
            "SLURM_JOB_NODELIST": "localhost,node-b",
            "SLURM_CPUS_PER_TASK": "1",
            **slurm,
        }
    )
    done = subprocess.run(
        ["bash", str(TRAIN_SBATCH), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, record_dir


def read_records(record_dir: Path, program: str) -> list[dict[str, object]]:
    files = sorted(record_dir.glob(f"{program}.*.json"))
    return [json.loads(path.read_text()) for path in files]


def free_port_in_job_port_range() -> int:
    for port in range(24000, 30000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 24000-29999")


@pytest.mark.parametrize("script", [SUBMIT, TRAIN_SBATCH], ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", [SUBMIT, TRAIN_SBATCH], ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script: Path) -> None:
    done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_submit_dry_run_prints_sbatch_with_options_and_intact_arguments() -> None:
    train_args = ["--config", "quickstart", "optim.epochs=1", "--output-dir", "runs/my run"]
    options = ["--nodes", "2", "--gpus-per-node", "4", "--time", "1:00:00"]
    options += ["--partition", "gpu", "--account", "eo-lab"]
    done = subprocess.run(
        [str(SUBMIT), "--dry-run", *options, "--", *train_args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout)
    assert command == [
        "sbatch",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--time=1:00:00",
        "--partition=gpu",
        "--account=eo-lab",
        str(TRAIN_SBATCH),
        *train_args,
    ]


@pytest.mark.parametrize(
    "bad_args", [["--nodes"], ["--config", "quickstart"]], ids=["missing-value", "no-separator"]
)
def test_submit_rejects_bad_options_before_calling_sbatch(bad_args: list[str]) -> None:
    done = subprocess.run([str(SUBMIT), "--dry-run", *bad_args], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "--help" in done.stderr


def test_submit_help() -> None:
    done = subprocess.run([str(SUBMIT), "-h"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: scripts/slurm/submit.sh")


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_sbatch_trains_two_real_ranks(tmp_path: Path, launcher: str) -> None:
    port = free_port_in_job_port_range()
    job_id = 7_770_000 + port - 20000  # train.sbatch listens on 20000 + job id % 10000
    run_dir = tmp_path / "run"
    done, _ = run_train_sbatch(
        tmp_path,
        fake_slurm_bin(tmp_path),
        [*TINY_RUN, "--output-dir", str(run_dir)],
        SLURM_JOB_ID=str(job_id),
        SLURM_GPUS_ON_NODE="2",
        SLURM_CPUS_ON_NODE="2",
        RSDINO_LAUNCHER=launcher,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"rendezvous localhost:{port}" in done.stderr
    final = saved_info(run_dir / "checkpoints", 3)
    # 3 steps x 2 ranks x 4 samples per rank: both ranks trained in one process group.
    assert final.samples_seen == 24 and final.world_size == 2
    assert len((run_dir / "train_log.jsonl").read_text().splitlines()) == 3


def test_sbatch_srun_launcher_environment_and_arguments(tmp_path: Path) -> None:
    args = ["--config", "quickstart", "--output-dir", "runs/my run", "optim.epochs=1"]
    done, records = run_train_sbatch(
        tmp_path, fake_slurm_bin(tmp_path, recorders=True), args, SLURM_CPUS_PER_TASK="8"
    )
    assert done.returncode == 0, done.stderr
    assert (records / "srun_options").read_text().split() == ["--kill-on-bad-exit=1"]
    tasks = read_records(records, "rsdino")
    assert len(tasks) == 2
    for task in tasks:
        assert task["argv"] == ["train", *args]
        assert task["MASTER_ADDR"] == "localhost"  # first host of "localhost,node-b"
        assert task["MASTER_PORT"] == str(20000 + 123456 % 10000)
        assert task["OMP_NUM_THREADS"] == "8"


def test_sbatch_torchrun_launcher_starts_one_rsdino_torchrun_per_node(tmp_path: Path) -> None:
    done, records = run_train_sbatch(
        tmp_path,
        fake_slurm_bin(tmp_path, recorders=True),
        ["--config", "quickstart", "--output-dir", "runs/a"],
        RSDINO_LAUNCHER="torchrun",
        SLURM_NTASKS="16",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_ON_NODE="64",
    )
    assert done.returncode == 0, done.stderr
    assert (records / "srun_options").read_text().split() == [
        "--kill-on-bad-exit=1",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--gpus-per-task=8",
        "--cpus-per-task=64",
    ]
    launched = read_records(records, "rsdino-torchrun")
    assert len(launched) == 2
    assert launched[0]["argv"] == [
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:23456",
        "--rdzv-id=123456",
        "-m",
        "rsdino.cli",
        "train",
        "--config",
        "quickstart",
        "--output-dir",
        "runs/a",
    ]


def test_sbatch_rejects_unknown_launcher(tmp_path: Path) -> None:
    done, records = run_train_sbatch(
        tmp_path, fake_slurm_bin(tmp_path, recorders=True), [], RSDINO_LAUNCHER="mpirun"
    )
    assert done.returncode == 2
    assert "RSDINO_LAUNCHER" in done.stderr
    assert not (records / "srun_options").exists()


def test_sbatch_uses_hostname_without_scontrol(tmp_path: Path) -> None:
    system_path = "/usr/bin:/bin"
    if shutil.which("scontrol", path=system_path) is not None:
        pytest.skip("a real scontrol is installed in /usr/bin or /bin")
    bin_dir = fake_slurm_bin(tmp_path, scontrol=False, recorders=True)
    done, records = run_train_sbatch(tmp_path, bin_dir, [], path_tail=system_path)
    assert done.returncode == 0, done.stderr
    assert read_records(records, "rsdino")[0]["MASTER_ADDR"] == socket.gethostname()


def test_sbatch_default_output_dir_is_stable_and_requeue_resumes(tmp_path: Path) -> None:
    done, records = run_train_sbatch(
        tmp_path,
        fake_slurm_bin(tmp_path, recorders=True),
        ["--config", "quickstart", "--no-resume"],
        SLURM_RESTART_COUNT="1",
    )
    assert done.returncode == 0, done.stderr
    # Same job id after a requeue, so the same folder; --no-resume would archive its checkpoints.
    expected = ["train", "--config", "quickstart", "--output-dir", "runs/slurm-123456"]
    assert [task["argv"] for task in read_records(records, "rsdino")] == [expected, expected]


def test_sbatch_first_attempt_keeps_no_resume(tmp_path: Path) -> None:
    done, records = run_train_sbatch(
        tmp_path, fake_slurm_bin(tmp_path, recorders=True), ["--no-resume", "--output-dir=r"]
    )
    assert done.returncode == 0, done.stderr
    assert read_records(records, "rsdino")[0]["argv"] == ["train", "--no-resume", "--output-dir=r"]


def test_sbatch_fails_when_a_rank_fails(tmp_path: Path) -> None:
    bin_dir = fake_slurm_bin(tmp_path)
    write_executable(bin_dir / "rsdino", '#!/usr/bin/env bash\n[[ "$SLURM_PROCID" == 0 ]]\n')
    done, _ = run_train_sbatch(tmp_path, bin_dir, [])
    assert done.returncode != 0


def test_sbatch_refuses_to_run_outside_slurm(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    done = subprocess.run(
        ["bash", str(TRAIN_SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "not inside a Slurm job" in done.stderr
