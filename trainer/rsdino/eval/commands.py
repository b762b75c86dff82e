"""``rsdino eval knn|linear|logreg|segmentation`` and ``rsdino attention``: argument parsing only.

Each handler builds the model and the labelled splits, then calls a library function that tests
call directly (:func:`rsdino.eval.run.run_probe`, :func:`rsdino.eval.attention.write_attention`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rsdino.config.loader import ConfigError
from rsdino.data.bands import band_names
from rsdino.data.storage import open_store
from rsdino.eval.datasets import EUROSAT_BANDS, LabelledSplits, scene_splits
from rsdino.eval.model import EvalModel, load_eval_model
from rsdino.eval.multilabel import BIGEARTHNET_19, multilabel_splits
from rsdino.eval.run import ProbeSettings, RunSettings, format_table, run_probe
from rsdino.eval.segtiles import segmentation_splits
from rsdino.eval.synthetic import synthetic_splits

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
        parser.set_defaults(handler=_run_eval)
    from rsdino.eval.attention_command import add_attention_command

    add_attention_command(sub)


def _read_text(uri: str) -> str:
    parent, _, name = uri.rpartition("/")
    return open_store(parent or ".").read(name).decode()


def class_options(path: str | None) -> tuple[tuple[str, ...] | None, dict | None]:
    """Class names, and for JSON mappings the table-label -> class map, from --classes."""
    if path is None:
        return None, None
    text = _read_text(path)
    if path.endswith(".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--classes {path} is not valid JSON ({error})") from error
        if isinstance(document, dict) and "classes" in document:
            return tuple(document["classes"]), document.get("map")
        if isinstance(document, dict):
            names = tuple(dict.fromkeys(v for v in document.values() if v is not None))
            return names, document
        return tuple(document), None
    return tuple(line.strip() for line in text.splitlines() if line.strip()), None


def _fill(model: EvalModel, bands: str | None, stats: str | None) -> dict[str, float] | None:
    if not bands:
        return None
    mean = model.normalizers(stats)["s2"].mean.flatten().tolist()
    names = band_names("s2", model.layout)
    unknown = [band for band in bands.split(",") if band not in names]
    if unknown:
        raise ConfigError(f"--fill-bands names {unknown}, not bands of the {model.layout} layout")
    return {band: mean[names.index(band)] for band in bands.split(",")}


def build_splits(args: argparse.Namespace, model: EvalModel, probe: str) -> LabelledSplits:
    """The labelled splits the arguments describe, in the model's band layout."""
    if args.dataset != "synthetic" and not args.data:
        raise ConfigError(f"--dataset {args.dataset} needs --data (a path or s3:// prefix)")
    split = {
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "seed": args.split_seed,
    }
    layout = model.layout
    if args.dataset == "synthetic":
        synthetic = model.cfg.train.synthetic
        task = "segmentation" if probe == "segmentation" else "scene"
        return synthetic_splits(
            "multilabel" if args.multilabel else task,
            counts=tuple(args.synthetic_counts),
            tile_size=args.tile_size or synthetic.tile_size,
            num_classes=synthetic.num_classes,
            layout=layout,
            seed=model.cfg.train.seed,
            index_offset=synthetic.num_samples,
        )
    store = open_store(args.data)
    names, label_map = class_options(args.classes)
    if args.dataset == "eurosat":
        return scene_splits(
            store,
            layout=layout,
            file_bands=EUROSAT_BANDS,
            size=args.tile_size or 64,
            split_dir=args.split_dir,
            fill=_fill(model, args.fill_bands, args.stats),
            **split,
        )
    if args.dataset == "bigearthnet":
        table = _read_text(args.labels).encode() if args.labels else None
        return multilabel_splits(
            store,
            table=table,
            table_source=args.labels or "",
            class_names=names or BIGEARTHNET_19,
            label_map=label_map,
            modalities=None,
            layout=layout,
            size=args.tile_size or 120,
            fill=_fill(model, args.fill_bands or "B10", args.stats)
            if layout == "sen12ms"
            else None,
            **split,
        )
    num_classes = args.num_classes or (len(names) if names else None)
    if num_classes is None:
        raise ConfigError("--dataset segmentation needs --num-classes or --classes")
    return segmentation_splits(
        store,
        num_classes=num_classes,
        class_names=names,
        ignore_index=args.ignore_index,
        layout=layout,
        size=args.tile_size,
        split_dir=args.split_dir,
        fill=_fill(model, args.fill_bands, args.stats),
        **split,
    )


def _run_eval(args: argparse.Namespace) -> int:
    model = load_eval_model(args.model, args.step)
    splits = build_splits(args, model, args.probe)
    settings = RunSettings(
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.workers,
        modes=tuple(args.modes.split(",")) if args.modes else None,
        stats=args.stats,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        out=args.out,
    )
    probe = ProbeSettings(seed=args.seed)
    if args.probe == "knn":
        probe.ks, probe.temperature = args.k, args.temperature
    elif args.probe == "logreg":
        probe.max_iter = args.max_iter
        if args.l2:
            probe.l2_grid = args.l2
    else:
        probe.lrs, probe.epochs = args.lrs, args.epochs
    report = run_probe(args.probe, model, splits, settings, probe)
    print(format_table(report))
    return 0
