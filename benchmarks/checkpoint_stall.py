"""Checkpoint stall of training (async vs sync) and time to recover from a lost worker.

Stall: one trainer runs the same batches three times, without checkpoints, with sync saves and
with async saves every ``--every`` steps. Reported per checkpoint: the time the save call blocked
the loop, and the *overhead* (wall time of the run with saves minus the run without, divided by
the number of saves), which also counts what the background writer takes from the steps.

Recovery: ``rsdino train`` under ``torchrun --max-restarts=1`` with ``--procs`` ranks; once the
first checkpoint is complete and a few more steps are logged, one worker gets SIGKILL. Reported:
seconds from the kill to the first step the restarted group logs (process start, rendezvous,
model build, checkpoint load and one step included).

    python benchmarks/checkpoint_stall.py                       # CPU, quickstart
    python benchmarks/checkpoint_stall.py --config vitl16_short --procs 1 train.device=cuda
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rsdino.config.loader import load_config
from rsdino.data.storage import LocalStore
from rsdino.data.worker_stats import WORKER_STATS_KEY
from rsdino.train.checkpoint import Checkpointer, CheckpointStore, checkpoint_name
from rsdino.train.loop import Trainer, make_loader

MODES = ("none", "sync", "async")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def measure_stall(cfg: DictConfig, steps: int, every: int, workdir: Path) -> dict[str, Any]:
    trainer = Trainer(cfg, workdir / "run", resume=False)
    device = trainer.device
    loader = iter(make_loader(cfg, 0, trainer.ctx))
    batches = [next(loader) for _ in range(steps + 1)]
    del loader
    for batch in batches:
        batch.pop(WORKER_STATS_KEY, None)
    trainer.model.train()
    trainer.train_step(batches[0], 0)  # warm-up: allocations, kernels
    step = 1
    results: dict[str, Any] = {}
    for mode in MODES:
        root = workdir / mode
        trainer.checkpointer = Checkpointer(
            CheckpointStore(LocalStore(root)),
            keep=2,
            async_save=mode == "async",
            is_main=True,
            pinned_staging=device.type == "cuda",
        )
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
            results[mode]["checkpoint_bytes"] = _directory_bytes(root / checkpoint_name(newest))
    for mode in ("sync", "async"):
        extra = results[mode]["loop_seconds"] - results["none"]["loop_seconds"]
        results[mode]["overhead_seconds_per_checkpoint"] = extra / results[mode]["checkpoints"]
    results["none"]["step_seconds_mean"] = results["none"]["loop_seconds"] / steps
    results["async_vs_sync_stall_ratio"] = (
        results["async"]["stall_seconds_mean"] / results["sync"]["stall_seconds_mean"]
    )
    return results


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in found.split()]


def _log_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


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
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    marker = run / "checkpoints" / checkpoint_name(every) / "rsdino-checkpoint.json"
    log_path = run / "train_log.jsonl"
    try:
        while not marker.exists() or len(_log_records(log_path)) < every + 2:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(agent.communicate()[0].decode(errors="replace")[-3000:])
            time.sleep(0.02)
        workers = _children(agent.pid)
        killed_at = time.time()
        os.kill(workers[-1], signal.SIGKILL)
        while True:
            after = [r for r in _log_records(log_path) if r["time"] > killed_at]
            # Steps that were already in flight may still log just after the kill; the
            # restarted group's first step is the one after the checkpoint it resumed from.
            resumed = [r for r in after if r["step"] <= every + 1 and r["time"] > killed_at]
            if resumed:
                break
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(agent.communicate()[0].decode(errors="replace")[-3000:])
            time.sleep(0.02)
    finally:
        agent.kill()
        agent.wait()
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
