"""The ``rsdino`` command. Each subcommand is a thin shell over a function tests call directly."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rsdino import __version__
from rsdino.bench.arguments import add_bench_commands
from rsdino.config.loader import ConfigError, available_presets, config_to_yaml, load_config
from rsdino.data.arguments import add_data_commands
from rsdino.error_boundary import run_reporting_errors
from rsdino.eval.arguments import add_eval_commands

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("rsdino")

TRAIN_EPILOG = """\
configuration:
  The run config is default.yaml, then the preset or file given by --config, then the
  key=value overrides, each layer replacing keys of the one before. Unknown keys, wrong
  types and impossible values are errors that name the key.
  Presets: {presets}

examples:
  rsdino train --config quickstart --output-dir runs/quickstart
  rsdino train --config vitl16_short_s2 --output-dir runs/s2 optim.epochs=50
  rsdino train --config my_run.yaml --no-resume student.drop_path_rate=0.2
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsdino",
        description="DINOv2 self-supervised pretraining for multimodal remote sensing.",
    )
    parser.add_argument("--version", action="version", version=f"rsdino {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an error, not only its line"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="pretrain a ViT with DINOv2 (resumes from the newest checkpoint by default)",
        description="Pretrain a ViT with DINOv2 on the configured dataset.",
        epilog=TRAIN_EPILOG.format(presets=", ".join(available_presets())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--config",
        metavar="PRESET_OR_FILE",
        default=None,
        help="a preset name (see below) or a path to a YAML file merged over default.yaml",
    )
    train.add_argument(
        "--output-dir",
        metavar="DIR",
        type=Path,
        default=Path("runs/default"),
        help="run directory for config.yaml, checkpoints/ and train_log.jsonl "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--no-resume",
        action="store_true",
        help="start from step 0 even if DIR holds checkpoints (they are kept aside, not deleted)",
    )
    train.add_argument(
        "--resume-from-step",
        metavar="N",
        type=int,
        default=None,
        help="resume from the complete checkpoint of step N instead of the newest (after a "
        "divergence); later checkpoints of a local run are kept aside, not deleted",
    )
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and exit without training",
    )
    train.set_defaults(handler=_run_train)
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides by dotted path, e.g. optim.base_lr=0.001 crops.local_crops_number=4",
    )
    add_data_commands(sub)
    add_eval_commands(sub)
    _add_export_command(sub)
    add_bench_commands(sub)
    return parser


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="write a checkpoint's teacher encoder(s) to one safetensors file",
        description="Write the teacher encoder(s) of a complete checkpoint to one safetensors "
        "file, with the run's resolved config in its metadata and beside it (--out with .yaml "
        "in place of .safetensors: teacher.safetensors -> teacher.yaml), and the band "
        "statistics to normalise inputs by, (x - mean) / std per band, in the metadata key "
        "band_stats. --out is checked before the checkpoint is read. Checkpoints on S3 use the "
        "AWS_* environment (or the run config's train.storage).",
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--output-dir", metavar="DIR", type=Path, help="a run directory of rsdino train"
    )
    source.add_argument(
        "--checkpoint-dir", metavar="URI", help="a checkpoint root: a path or s3://bucket/prefix"
    )
    export.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the newest complete)"
    )
    export.add_argument(
        "--out", metavar="FILE", type=Path, required=True, help="the .safetensors file to write"
    )
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from rsdino.data.storage import open_store
    from rsdino.export import checkpoints_of_run, export_teacher

    store = (
        checkpoints_of_run(args.output_dir)
        if args.output_dir is not None
        else open_store(args.checkpoint_dir)
    )
    result = export_teacher(store, args.out, args.step)
    print(f"wrote {result.path} (teacher encoder of {result.source}, step {result.step})")
    return 0


def _train_config(args: argparse.Namespace) -> DictConfig:
    if args.no_resume and args.resume_from_step is not None:
        raise ConfigError("--no-resume and --resume-from-step contradict each other; pick one")
    return load_config(args.config, args.overrides)


def check_train_config(argv: Sequence[str]) -> int:
    """Validate the config of ``rsdino ARGV`` when it trains, reporting as ``rsdino`` does (0 when
    valid or when ARGV is another command).

    ``rsdino-torchrun`` calls this in each pod before the rendezvous, so a bad config fails every
    pod with its own exit 2 instead of failing one pod and leaving its peers to lose the store.
    """
    args = _parse_args(argv)
    if args.command != "train":
        return 0

    def check() -> int:
        _train_config(args)
        return 0

    return run_reporting_errors(check, debug=args.debug)


def _run_train(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from rsdino.train.loop import train  # imported late: torch start-up is slow for --help

    result = train(
        cfg,
        args.output_dir,
        resume=not args.no_resume,
        preset=args.config,
        resume_from_step=args.resume_from_step,
    )
    log.info("finished at step %d; last checkpoint: %s", result.final_step, result.last_checkpoint)
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting the options of a command with overrides (``train``, ``bench train``) stand
    between its key=value overrides."""
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    is_main_process = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    logging.basicConfig(
        level=logging.INFO if is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    # GDAL reports every undecodable tile at INFO; rsdino's own bad-data line names the file.
    logging.getLogger("rasterio").setLevel(logging.WARNING)
    return run_reporting_errors(lambda: args.handler(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
