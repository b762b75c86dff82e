"""One probe end to end: features per modality mode (cached), the probe, a JSON report, a table.

The ``rsdino eval`` subcommands are thin shells over :func:`run_probe`; tests call it directly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from rsdino.data.storage import open_store
from rsdino.errors import ExitCode, RsdinoError
from rsdino.eval.datasets import SPLITS, LabelledSplits
from rsdino.eval.features import FeatureCache, extract_features, modes_of
from rsdino.eval.knn import DINOV2_KS, knn_multilabel, knn_predict
from rsdino.eval.linear import DEFAULT_LRS, train_linear_probes
from rsdino.eval.logreg import DEFAULT_L2, logistic_regression_probe
from rsdino.eval.metrics import classification_metrics
from rsdino.eval.model import EvalModel
from rsdino.eval.segmentation import DEFAULT_SEG_LRS, train_segmentation_probes

PROBES = ("knn", "linear", "logreg", "segmentation")
_TASKS_OF_PROBE = {
    "knn": ("scene", "multilabel"),
    "linear": ("scene", "multilabel"),
    "logreg": ("scene", "multilabel"),
    "segmentation": ("segmentation",),
}


class EvalUsageError(RsdinoError):
    """A probe asked of data or a model it does not apply to."""

    exit_code = ExitCode.CONFIG


@dataclass
class ProbeSettings:
    """Everything that tunes a probe; unused fields are ignored by the other probes."""

    ks: tuple[int, ...] = DINOV2_KS
    temperature: float = 0.07
    lrs: tuple[float, ...] | None = None
    epochs: int | None = None
    l2_grid: tuple[float, ...] = DEFAULT_L2
    max_iter: int = 200
    seed: int = 0


@dataclass
class RunSettings:
    """How features are computed and where the report goes."""

    batch_size: int = 64
    device: str = "cpu"
    num_workers: int = 0
    modes: tuple[str, ...] | None = None
    stats: str | None = None
    cache_dir: Path | None = field(default=None)
    use_cache: bool = True
    out: str | None = None


def default_cache_dir(model: EvalModel) -> Path:
    """Beside a local checkpoint/export; in the user's cache for S3 checkpoints."""
    if "://" not in model.results_uri:
        return Path(model.results_uri) / "feature_cache"
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return home / "rsdino" / "eval_features"


def _target_field(task: str) -> str:
    return {"scene": "label", "multilabel": "labels", "segmentation": "mask"}[task]


def collect_features(
    model: EvalModel, splits: LabelledSplits, settings: RunSettings, patch_tokens: bool
) -> dict[str, dict[str, dict[str, Tensor]]]:
    """{mode: {split: features}} for every requested mode, each extracted once and cached."""
    available = modes_of(model.encoder, splits.modalities)
    modes = list(settings.modes) if settings.modes else available
    unknown = [mode for mode in modes if mode not in available]
    if unknown:
        raise EvalUsageError(
            f"modes {unknown} are not possible for this model and data; choose from {available}"
        )
    cache = FeatureCache(
        (settings.cache_dir or default_cache_dir(model)) if settings.use_cache else None
    )
    normalizers = model.normalizers(settings.stats)
    found: dict[str, dict[str, dict[str, Tensor]]] = {}
    for mode in modes:
        found[mode] = {}
        for split in SPLITS:
            dataset = splits.split(split)
            if len(dataset) == 0:
                raise EvalUsageError(f"the {split} split of the dataset is empty")
            key = cache.key(
                model.identity, splits.identity, split, mode, patch_tokens, settings.stats
            )
            found[mode][split] = cache.load_or_compute(
                key,
                lambda dataset=dataset, mode=mode, split=split: extract_features(
                    model.encoder,
                    dataset,
                    normalizers,
                    mode=mode,
                    patch_tokens=patch_tokens,
                    batch_size=settings.batch_size,
                    device=settings.device,
                    label=f"{mode:>6} {split:<5}",
                    num_workers=settings.num_workers,
                ),
            )
    return found


def _probe_one(
    probe: str, feats: dict[str, dict[str, Tensor]], splits: LabelledSplits, p: ProbeSettings
) -> dict:
    target = _target_field(splits.task)
    train, val, test = feats["train"], feats["val"], feats["test"]
    if probe == "knn":
        bank = train  # as in DINOv2: the training split is the memory bank, test is queried
        if splits.task == "multilabel":
            per_k = knn_multilabel(
                bank["cls"],
                bank[target],
                test["cls"],
                test[target],
                ks=p.ks,
                temperature=p.temperature,
            )
        else:
            predicted = knn_predict(
                bank["cls"],
                bank[target],
                test["cls"],
                ks=p.ks,
                temperature=p.temperature,
                num_classes=splits.num_classes,
            )
            per_k = {
                k: classification_metrics(classes, test[target], splits.num_classes)
                for k, classes in predicted.items()
            }
        return {f"k={k}": metrics for k, metrics in per_k.items()}
    if probe == "linear":
        result = train_linear_probes(
            train,
            val,
            test,
            target=target,
            num_classes=splits.num_classes,
            lrs=p.lrs or DEFAULT_LRS,
            epochs=p.epochs or 50,
            seed=p.seed,
        )
    elif probe == "logreg":
        result = logistic_regression_probe(
            train,
            val,
            test,
            target=target,
            num_classes=splits.num_classes,
            l2_grid=p.l2_grid,
            max_iter=p.max_iter,
        )
    else:
        result = train_segmentation_probes(
            train,
            val,
            test,
            num_classes=splits.num_classes,
            ignore_index=splits.ignore_index,
            lrs=p.lrs or DEFAULT_SEG_LRS,
            epochs=p.epochs or 20,
            seed=p.seed,
        )
    return {"best": result.best, "grid": result.grid}


def run_probe(
    probe: str,
    model: EvalModel,
    splits: LabelledSplits,
    settings: RunSettings | None = None,
    probe_settings: ProbeSettings | None = None,
) -> dict:
    """Run ``probe`` in every modality mode; write the JSON report; return it."""
    settings = settings or RunSettings()
    probe_settings = probe_settings or ProbeSettings()
    if probe not in PROBES:
        raise EvalUsageError(f"unknown probe {probe!r}; expected one of {PROBES}")
    if splits.task not in _TASKS_OF_PROBE[probe]:
        raise EvalUsageError(
            f"the {probe} probe does not apply to {splits.task} data; use "
            + ("`rsdino eval segmentation`" if splits.task == "segmentation" else "knn/linear")
        )
    features = collect_features(model, splits, settings, patch_tokens=probe == "segmentation")
    results = {
        mode: _probe_one(probe, per_split, splits, probe_settings)
        for mode, per_split in features.items()
    }
    report = {
        "probe": probe,
        "model": {"source": model.identity, "step": model.step, "name": model.name},
        "dataset": {
            "task": splits.task,
            "identity": splits.identity,
            "classes": list(splits.class_names),
            "sizes": {split: len(splits.split(split)) for split in SPLITS},
        },
        "settings": {
            "ks": list(probe_settings.ks),
            "temperature": probe_settings.temperature,
            "lrs": list(probe_settings.lrs) if probe_settings.lrs else None,
            "epochs": probe_settings.epochs,
        },
        "results": results,
    }
    report["written_to"] = write_report(report, model, settings.out)
    return report


def write_report(report: dict, model: EvalModel, out: str | None) -> str:
    """The report as JSON at ``out`` or beside the model (a local path or an s3:// URI)."""
    task = report["dataset"]["task"]
    suffix = f"_{task}" if task == "multilabel" else ""
    name = f"{model.name}.eval_{report['probe']}{suffix}.json"
    target = out or f"{model.results_uri.rstrip('/')}/{name}"
    parent, _, file_name = target.rpartition("/")
    text = json.dumps(report, indent=2, default=_json_default, allow_nan=True) + "\n"
    open_store(parent or ".").write(file_name, text.encode())
    return target


def _json_default(value: object) -> object:
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _fmt(value: float) -> str:
    return "   n/a" if value is None or math.isnan(value) else f"{100 * value:6.2f}"


def _scalars(metrics: dict) -> dict:
    """The metrics a table cell can show (confusion matrices stay in the JSON report)."""
    return {name: value for name, value in metrics.items() if not isinstance(value, list)}


def format_table(report: dict) -> str:
    """A few lines for the terminal: one row per modality mode, test metrics in percent."""
    probe, results = report["probe"], report["results"]
    lines = []
    if probe == "knn":
        columns = list(next(iter(results.values())))
        metric = next(iter(next(iter(results.values())).values()))
        names = list(_scalars(metric))
        header = ["mode", *[f"{c} {n}" for c in columns for n in names]]
        lines.append("  ".join(f"{h:>18}" for h in header))
        for mode, per_k in results.items():
            cells = [_fmt(per_k[c][n]) for c in columns for n in names]
            lines.append("  ".join(f"{v:>18}" for v in [mode, *cells]))
    else:
        for mode, result in results.items():
            best = result["best"]
            test = best["test"]
            chosen = ", ".join(
                f"{key}={best[key]}" for key in ("features", "lr", "l2") if key in best
            )
            if probe == "segmentation":
                per_class = " ".join(_fmt(v).strip() for v in test["per_class_iou"])
                metrics = f"mIoU {_fmt(test['miou'])}  pixel acc {_fmt(test['pixel_accuracy'])}"
                lines.append(f"{mode:>6}  {metrics}  ({chosen})  per-class IoU: {per_class}")
            else:
                metrics = "  ".join(f"{name} {_fmt(v)}" for name, v in _scalars(test).items())
                lines.append(f"{mode:>6}  {metrics}  ({chosen})")
    if "written_to" in report:  # not part of the file itself
        lines.append(f"report: {report['written_to']}")
    return "\n".join(lines)
