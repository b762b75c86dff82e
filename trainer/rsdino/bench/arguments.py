"""Options of `rsdino bench train`; the handler loads when the command runs (no torch here)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rsdino.command_handler import lazy_handler

MODES = ("model", "step", "e2e")
BENCH_TRAIN_EPILOG = """\
modes (each times --steps steps after --warmup untimed ones, on one rank):
  model  optimisation only: every step's views (crops, masks) are built on the device before
         the clock starts; forward, backward, clipping, optimizer step and EMA are timed
  step   Trainer.train_step on batches fetched from the loader beforehand: view building and
         optimisation, no data loading
  e2e    the real loader on synthetic tiles packed into local shards (train.num_workers, at most
         4; four batches of tiles, read round epoch after epoch); each step includes the wait
         for its batch, reported as data_wait_fraction

The data is always the config's synthetic world (train.synthetic); no checkpoints, no metrics.
The JSON report goes to stdout and to --out; see the README's Benchmarks section for its fields.

examples:
  rsdino bench train --config quickstart --mode step
  rsdino bench train --config vitl16_short --mode e2e --warmup 3 --steps 10 \\
      --out runs/vitl16_e2e.json train.device=cuda
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` with its one measurement so far, ``train``."""
    bench = sub.add_parser("bench", help="measure the trainer: step time, images/s, MFU")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    train = bench_sub.add_parser(
        "train",
        help="time training steps of a config (model only, full step, or end to end)",
        description="Time training steps of a config on one rank and report step time, "
        "images/s, MFU and peak memory as JSON.",
        epilog=BENCH_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--config",
        metavar="PRESET_OR_FILE",
        default=None,
        help="a preset name or a YAML file, as for rsdino train",
    )
    train.add_argument("--mode", choices=MODES, default="step", help="what is timed (%(default)s)")
    train.add_argument(
        "--warmup", type=_positive, default=3, help="untimed steps first (%(default)s)"
    )
    train.add_argument("--steps", type=_positive, default=10, help="timed steps (%(default)s)")
    train.add_argument(
        "--peak-tflops",
        type=_positive_float,
        default=None,
        help="device peak for MFU (default: 989 on H100/H200, dense bf16; else no MFU)",
    )
    train.add_argument(
        "--out", metavar="FILE", type=Path, default=None, help="also write the JSON here"
    )
    train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, as for rsdino train"
    )
    train.set_defaults(handler=lazy_handler("rsdino.bench.train:run_bench_train"))
