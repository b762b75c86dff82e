"""Exporter overhead on step time: the metric calls a training step makes, and a scrape.

Measures (1) the host time of the per-step metric calls (`observe_step`) and of the per-interval
call (`observe_interval`), (2) the time to render all families for one scrape, and relates both
to the measured step time of the same config, so the overhead is a ratio:

    python benchmarks/metrics_overhead.py                       # quickstart on this machine
    python benchmarks/metrics_overhead.py --config vitl16_short_s2 train.device=cuda
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from prometheus_client import generate_latest

from rsdino.config.loader import load_config
from rsdino.ssl.meta_arch import SSLMetaArch
from rsdino.train.dist import DistContext
from rsdino.train.loop import train
from rsdino.train.metrics import estimate_step_cost, start_metrics
from rsdino.train.runtime import resolve_device


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def per_call_seconds(call, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--steps", type=int, default=50, help="training steps timed")
    parser.add_argument("--scrape-interval", type=float, default=15.0, help="seconds")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    base = [f"metrics.port={free_port()}", "metrics.host=127.0.0.1", *args.overrides]
    cfg = load_config(
        args.config, [*base, "optim.epochs=1", f"train.OFFICIAL_EPOCH_LENGTH={args.steps}"]
    )
    with TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train(cfg, Path(out) / "run")
        step_seconds = (time.perf_counter() - started) / result.final_step

    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=resolve_device(cfg.train.device))
    exporter_cfg = load_config(args.config, base)
    cost = estimate_step_cost(exporter_cfg, SSLMetaArch(exporter_cfg).student)
    metrics = start_metrics(exporter_cfg, ctx, args.config, cost)
    losses = {"dino_global": 1.0, "dino_local": 2.0, "ibot": 1.5, "koleo": 0.1, "total": 4.6}
    scalars = {"lr": 1e-3, "wd": 0.04, "momentum": 0.99, "teacher_temp": 0.04}
    step_call = per_call_seconds(lambda: metrics.observe_step(1, 32, 0.001, 0.1), 10000)
    interval_call = per_call_seconds(lambda: metrics.observe_interval(losses, scalars), 1000)
    scrape = per_call_seconds(lambda: generate_latest(metrics.registry), 200)
    metrics.close()

    log_every = cfg.train.log_every_steps
    per_step = step_call + interval_call / log_every + scrape * step_seconds / args.scrape_interval
    report = {
        "config": args.config,
        "step_seconds": round(step_seconds, 5),
        "observe_step_us": round(step_call * 1e6, 2),
        "observe_interval_us": round(interval_call * 1e6, 2),
        "scrape_render_ms": round(scrape * 1e3, 3),
        "overhead_per_step_us": round(per_step * 1e6, 2),
        "overhead_ratio": per_step / step_seconds,
        "target_ratio": 0.01,
    }
    print(json.dumps(report, indent=2))
    return 0 if report["overhead_ratio"] < report["target_ratio"] else 1


if __name__ == "__main__":
    sys.exit(main())
