"""Checkpoint stall of training (async vs sync) and time to recover from a lost worker.

Stall: three trainers, built alike but for ``checkpoint.async_save``, run the same batches:
without checkpoints, with sync saves and with async saves every ``--every`` steps, each to its own
local directory. Reported per checkpoint: the time the save call blocked the loop, and the
*overhead* (wall time of the run with saves minus the run without, divided by
the number of saves), which also counts what the background writer takes from the steps.

Recovery: ``rsdino train`` under ``torchrun --max-restarts=1`` with ``--procs`` ranks; once the
first checkpoint is complete and a few more steps are logged, one worker gets SIGKILL. Reported:
seconds from the kill to the first step the restarted group logs (process start, rendezvous,
model build, checkpoint load and one step included). torchrun runs in a session of its own;
at the end it and every process below it are killed and awaited before the temporary
directory they write into is deleted.

    python benchmarks/checkpoint_stall.py                       # CPU, quickstart
    python benchmarks/checkpoint_stall.py --config vitl16_short --procs 1 train.device=cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig, OmegaConf

from rsdino.config.loader import load_config
from rsdino.data.worker_stats import WORKER_STATS_KEY
from rsdino.train.checkpoint import checkpoint_name
from rsdino.train.loop import Trainer, make_loader
from rsdino.train.output_dir import output_paths

MODES = ("none", "sync", "async")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def measure_stall(cfg: DictConfig, steps: int, every: int, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    batches: list[dict] = []
    for mode in MODES:
        # A trainer per mode, built from the config as `rsdino train` builds it: the same seed
        # gives each the same initial weights, and only checkpoint.async_save differs.
        mode_cfg = OmegaConf.merge(cfg, {"checkpoint": {"async_save": mode == "async", "dir": ""}})
        root = workdir / mode
        trainer = Trainer(mode_cfg, root, resume=False)
        device = trainer.device
        if not batches:
            loader = iter(make_loader(cfg, 0, trainer.ctx))
            batches = [next(loader) for _ in range(steps + 1)]
            del loader
            for batch in batches:
                batch.pop(WORKER_STATS_KEY, None)
        trainer.model.train()
        trainer.train_step(batches[0], 0)  # warm-up: allocations, kernels
        step = 1
        stalls = []
        _sync(device)
        started = time.perf_counter()
        for batch in batches[1:]:
            trainer.train_step(batch, step)
            step += 1
            if mode != "none" and step % every == 0:
                save_started = time.perf_counter()
                trainer.save(step)
                stalls.append(time.perf_counter() - save_started)
            else:
                trainer.checkpointer.poll()
        _sync(device)
        loop_seconds = time.perf_counter() - started
        drain_started = time.perf_counter()
        trainer.checkpointer.wait()
        results[mode] = {
            "loop_seconds": loop_seconds,
            "checkpoints": len(stalls),
            "stall_seconds_mean": sum(stalls) / len(stalls) if stalls else 0.0,
            "stall_seconds_max": max(stalls, default=0.0),
            "final_wait_seconds": time.perf_counter() - drain_started,
            "complete_checkpoints": trainer.checkpointer.store.complete_steps(),
        }
        if mode != "none":
            newest = results[mode]["complete_checkpoints"][-1]
            newest_dir = output_paths(root).checkpoints / checkpoint_name(newest)
            results[mode]["checkpoint_bytes"] = _directory_bytes(newest_dir)
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for mode in ("sync", "async"):
        extra = results[mode]["loop_seconds"] - results["none"]["loop_seconds"]
        results[mode]["overhead_seconds_per_checkpoint"] = extra / results[mode]["checkpoints"]
    results["none"]["step_seconds_mean"] = results["none"]["loop_seconds"] / steps
    results["async_vs_sync_stall_ratio"] = (
        results["async"]["stall_seconds_mean"] / results["sync"]["stall_seconds_mean"]
    )
    return results


def _process_table() -> dict[int, tuple[int, str, str]]:
    """Every live process as pid -> (parent pid, state letter, start time), from /proc (Linux)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited while the table was read
            continue
        # The command name (in parentheses) may hold spaces; the fields after it do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def _descendants(pid: int, table: dict[int, tuple[int, str, str]]) -> list[int]:
    """Children, grandchildren, ... of ``pid`` in ``table``, parents before their children."""
    found: list[int] = []
    parents = [pid]
    while parents:
        children = [child for child, row in table.items() if row[0] in parents]
        found.extend(children)
        parents = children
    return found


def _children(pid: int) -> list[int]:
    table = _process_table()
    return [child for child, row in table.items() if row[0] == pid]


def _kill_tree(launcher: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL the launcher and every process below it, and return once none of them is left.

    torchrun starts each worker in a session of its own, so killing torchrun's process group
    misses them, and a worker whose launcher died is re-parented and keeps writing into the run
    directory. So the tree is frozen first: every process found gets SIGSTOP (a stopped process
    cannot fork), the search repeats until it finds nothing new, and only then all get SIGKILL.
    The workers are not our children, so their end is awaited in /proc (a zombie counts as gone).
    """
    if launcher.poll() is not None:
        return  # it ended (and was reaped) on its own, after its workers
    frozen: dict[int, str] = {}  # pid -> start time, which tells a reused pid apart
    os.killpg(launcher.pid, signal.SIGSTOP)  # the launcher and its own process group
    while True:
        table = _process_table()
        if launcher.pid in table:
            frozen.setdefault(launcher.pid, table[launcher.pid][2])
        new = [pid for pid in _descendants(launcher.pid, table) if pid not in frozen]
        if not new:
            break
        for pid in new:
            frozen[pid] = table[pid][2]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
    os.killpg(launcher.pid, signal.SIGKILL)  # still ours to signal: not reaped yet
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.wait(timeout)
    deadline = time.monotonic() + timeout
    while True:
        table = _process_table()
        alive = [
            pid
            for pid, started in frozen.items()
            if pid in table and table[pid][2] == started and table[pid][1] != "Z"
        ]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {alive} of the recovery run outlived SIGKILL")
        time.sleep(0.02)


def _log_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def _output_of(agent: subprocess.Popen, output: IO[bytes]) -> str:
    """The end of what the launcher and its workers printed, once none of them is left."""
    _kill_tree(agent)
    output.seek(0)
    return output.read().decode(errors="replace")[-3000:]


def _kill_one_worker_and_wait(
    agent: subprocess.Popen, output: IO[bytes], run: Path, every: int, timeout: float
) -> tuple[float, list[dict]]:
    """SIGKILL a worker after the first checkpoint; the kill time and the resumed step's record."""
    deadline = time.monotonic() + timeout
    marker = run / "checkpoints" / checkpoint_name(every) / "rsdino-checkpoint.json"
    log_path = run / "train_log.jsonl"
    while not marker.exists() or len(_log_records(log_path)) < every + 2:
        if agent.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(_output_of(agent, output))
        time.sleep(0.02)
    workers = _children(agent.pid)
    killed_at = time.time()
    os.kill(workers[-1], signal.SIGKILL)
    while True:
        after = [r for r in _log_records(log_path) if r["time"] > killed_at]
        # Steps that were already in flight may still log just after the kill; the
        # restarted group's first step is the one after the checkpoint it resumed from.
        resumed = [r for r in after if r["step"] <= every + 1]
        if resumed:
            return killed_at, resumed
        if agent.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(_output_of(agent, output))
        time.sleep(0.02)


def measure_recovery(
    preset: str, overrides: list[str], procs: int, every: int, workdir: Path, timeout: float
) -> dict[str, Any]:
    run = workdir / "recovery"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        "--max-restarts=1",
        "-m",
        "rsdino.cli",
        "train",
        "--config",
        preset,
        "--output-dir",
        str(run),
        *overrides,
        "train.log_every_steps=1",
        f"checkpoint.every_steps={every}",
        "metrics.enabled=false",
    ]
    # A file, not a pipe, takes the output: nobody reads it until the end, and a full pipe
    # would block the workers. Its own session: signals meant for the benchmark skip it.
    with tempfile.TemporaryFile() as output:
        agent = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            killed_at, resumed = _kill_one_worker_and_wait(agent, output, run, every, timeout)
        finally:
            _kill_tree(agent)  # before anyone deletes the run directory they write into
    return {
        "procs": procs,
        "resumed_at_step": resumed[0]["step"],
        "death_to_first_step_seconds": resumed[0]["time"] - killed_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart", help="preset or YAML file")
    parser.add_argument("--steps", type=int, default=30, help="steps per stall mode")
    parser.add_argument("--every", type=int, default=5, help="checkpoint period in steps")
    parser.add_argument("--procs", type=int, default=2, help="ranks in the recovery run")
    parser.add_argument("--no-recovery", action="store_true", help="measure the stall only")
    parser.add_argument("--timeout", type=float, default=300.0, help="recovery run limit (s)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    # Enough scheduled steps for three modes; no exporter; loader workers off for the stall.
    stall_overrides = [
        *args.overrides,
        "train.OFFICIAL_EPOCH_LENGTH=1000",
        "metrics.enabled=false",
    ]
    cfg = load_config(args.config, stall_overrides)
    report: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "host_cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as workdir:
        report["stall"] = measure_stall(cfg, args.steps, args.every, Path(workdir))
        if not args.no_recovery:
            report["recovery"] = measure_recovery(
                args.config,
                args.overrides,
                args.procs,
                args.every,
                Path(workdir),
                args.timeout,
            )
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
