"""Options of `rsdino eval PROBE` and `rsdino attention`; the handlers load when a command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from rsdino.command_handler import lazy_handler

TILE_BAND_ORDERS = ("layout", "eurosat")
DATASETS = ("eurosat", "bigearthnet", "segmentation", "synthetic")
EVAL_EPILOG = """\
MODEL is an `rsdino export` .safetensors file, a run directory of `rsdino train`, or a
checkpoint root (path or s3://bucket/prefix). Datasets (--data is a path or s3:// prefix):
  eurosat       <Class>/<Class>_<n>.tif, 13 bands, 64x64 (--split-dir with train/val/test.txt)
  bigearthnet   <patch>/<patch>_B02.tif ... and/or _VV.tif/_VH.tif, --labels TABLE (CSV/JSON)
  segmentation  images/<name>.tif + labels/<name>.tif (+ s1/<name>.tif), --num-classes
  synthetic     held-out tiles of the run's synthetic land-cover world (no --data)
Multimodal models are evaluated with S1+S2, S2 only and S1 only (missing-modality token).

examples:
  rsdino eval knn teacher.safetensors --dataset eurosat --data /data/EuroSAT_MS
  rsdino eval linear runs/quickstart --dataset synthetic
  rsdino eval segmentation teacher.safetensors --dataset synthetic
"""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from error


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="export file, run directory or checkpoint root"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--data", metavar="URI", help="dataset root: a path or s3:// prefix")
    parser.add_argument("--split-dir", metavar="KEY", help="folder under --data with split lists")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the seeded split")
    parser.add_argument("--tile-size", type=int, default=None, help="expected tile side (pixels)")
    parser.add_argument("--labels", metavar="URI", help="bigearthnet: the label table (CSV/JSON)")
    parser.add_argument(
        "--classes",
        metavar="FILE",
        help="class names, one per line; or JSON: a list of names, {table label: class|null}, "
        'or {"classes": [...], "map": {table label: class|null}}',
    )
    parser.add_argument("--num-classes", type=int, help="segmentation: number of classes")
    parser.add_argument("--ignore-index", type=int, default=255, help="segmentation (255)")
    parser.add_argument(
        "--fill-bands",
        default=None,
        metavar="B10,...",
        help="bands the data lacks, filled with their normalisation mean (bigearthnet: B10)",
    )
    parser.add_argument(
        "--synthetic-counts", type=_ints, default=(512, 128, 256), metavar="TRAIN,VAL,TEST"
    )
    parser.add_argument("--multilabel", action="store_true", help="synthetic: classes present")
    parser.add_argument("--modes", default=None, help="comma list of s1+s2, s2, s1 (default: all)")
    parser.add_argument("--stats", default=None, help="band statistics (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write features")
    parser.add_argument("--out", default=None, help="report file (default: beside the model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe's training")


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``eval`` (with one subcommand per probe) and ``attention``."""
    evaluate = sub.add_parser(
        "eval",
        help="evaluate frozen teacher features: knn, linear, logreg, segmentation",
        description="Probe a pretrained teacher's frozen features on labelled data.",
    )
    probes = evaluate.add_subparsers(dest="probe", required=True, metavar="PROBE")
    helps = {
        "knn": "weighted kNN on [CLS] (cosine, temperature-weighted votes, several k)",
        "linear": "linear heads on [CLS] and [CLS]+mean patch, a grid of learning rates",
        "logreg": "L2 logistic regression on [CLS] fitted with L-BFGS",
        "segmentation": "linear head on patch tokens upsampled to the mask (mIoU)",
    }
    for probe, text in helps.items():
        parser = probes.add_parser(
            probe,
            help=text,
            description=text,
            epilog=EVAL_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common(parser)
        if probe == "knn":
            parser.add_argument("--k", type=_ints, default=(10, 20, 100, 200), help="k values")
            parser.add_argument("--temperature", type=float, default=0.07)
        elif probe == "logreg":
            parser.add_argument("--l2", type=_floats, default=None, help="L2 strengths to try")
            parser.add_argument("--max-iter", type=int, default=200)
        else:
            parser.add_argument("--lrs", type=_floats, default=None, help="learning rates")
            parser.add_argument("--epochs", type=int, default=None)
        parser.set_defaults(handler=lazy_handler("rsdino.eval.commands:run_eval"))
    add_attention_command(sub)


def add_attention_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "attention",
        help="write per-head last-layer [CLS] attention maps of the teacher as PNGs",
        description="Render the teacher's last-layer [CLS] attention, per head and averaged, "
        "over the tile's true colour (B4, B3, B2, 2-98 percentile stretch) and, for "
        "multimodal models given --s1, over the SAR VV band.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="export file, run directory or checkpoint root"
    )
    parser.add_argument("tile", metavar="TILE", help="a Sentinel-2 GeoTIFF (path or s3:// URI)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--s1", metavar="TILE", help="the co-registered Sentinel-1 GeoTIFF")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument(
        "--tile-bands",
        choices=TILE_BAND_ORDERS,
        default="layout",
        help="band order of TILE: the model's layout (default) or EuroSAT-MS (B8A last)",
    )
    parser.add_argument("--scale", type=int, default=4, help="PNG enlargement (default 4)")
    parser.add_argument("--stats", default=None, help="band statistics (default: the run's)")
    parser.set_defaults(handler=lazy_handler("rsdino.eval.attention_command:run_attention"))
