"""The handler of ``rsdino eval knn|linear|logreg|segmentation`` (options: ``eval.arguments``).

The handler builds the model and the labelled splits, then calls a library function that tests
call directly (:func:`rsdino.eval.run.run_probe`).
"""

from __future__ import annotations

import argparse
import json

from rsdino.config.loader import ConfigError
from rsdino.data.bands import band_names
from rsdino.data.storage import open_store
from rsdino.eval.datasets import EUROSAT_BANDS, LabelledSplits, scene_splits
from rsdino.eval.model import EvalModel, load_eval_model
from rsdino.eval.multilabel import BIGEARTHNET_19, multilabel_splits
from rsdino.eval.run import ProbeSettings, RunSettings, format_table, run_probe
from rsdino.eval.segtiles import segmentation_splits
from rsdino.eval.synthetic import synthetic_splits


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
            texture_pairs=synthetic.get("texture_pairs", False),  # older runs: off
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


def run_eval(args: argparse.Namespace) -> int:
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
