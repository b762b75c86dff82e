"""Learning signal through `rsdino eval`: kNN and linear probes, pretrained teacher vs random init.

Pretrains a config (default: quickstart) on synthetic land-cover tiles, exports the teacher,
and runs `rsdino eval knn` and `rsdino eval linear` on held-out synthetic tiles (indices after
the training set, dominant land-cover class). The baseline is the same architecture at the
initial weights training starts from, probed by the same library function the command wraps.

    python benchmarks/eval_signal.py --output-dir runs/eval_signal
    python benchmarks/eval_signal.py --config quickstart_multimodal --output-dir runs/eval_mm

With ``train.synthetic.texture_pairs=true`` (the world whose classes the mean spectrum cannot
tell; the README's Evaluation section has the full command) the report also splits the kNN's
errors into pair-partner and other-spectrum tiles.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from rsdino.cli import main as rsdino_main
from rsdino.config.loader import load_config
from rsdino.data.storage import open_store
from rsdino.eval.model import EvalModel
from rsdino.eval.run import ProbeSettings, RunSettings, run_probe
from rsdino.eval.synthetic import synthetic_splits
from rsdino.export import export_teacher
from rsdino.ssl.meta_arch import SSLMetaArch
from rsdino.train.loop import train


def summary(report: dict) -> dict:
    """Test metrics per modality mode: kNN accuracy per k, or the chosen linear head's."""
    if report["probe"] == "knn":
        return {
            mode: {k: round(m["accuracy"], 4) for k, m in per_k.items()}
            for mode, per_k in report["results"].items()
        }
    return {
        mode: {
            "accuracy": round(result["best"]["test"]["accuracy"], 4),
            "features": result["best"]["features"],
            "lr": result["best"]["lr"],
        }
        for mode, result in report["results"].items()
    }


def pair_errors(report: dict, k: int = 20) -> dict:
    """Per modality mode, the share of test tiles the kNN takes for their texture-pair partner
    (same spectrum, other texture) and for a class of another spectrum: what pretraining adds
    shows in the first; the second mostly comes from tiles whose classes nearly tie."""
    found = {}
    for mode, per_k in report["results"].items():
        confusion = per_k[f"k={k}"]["confusion"]
        total = sum(map(sum, confusion))
        wrong = total - sum(confusion[c][c] for c in range(len(confusion)))
        partner = sum(row[c ^ 1] for c, row in enumerate(confusion) if c ^ 1 < len(row))
        found[mode] = {
            "pair_partner": round(partner / total, 4),
            "other_spectrum": round((wrong - partner) / total, 4),
        }
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/eval_signal"))
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--counts", default="1000,200,500", help="train,val,test tiles")
    parser.add_argument("--epochs", type=int, default=50, help="linear probe epochs")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    counts = tuple(int(part) for part in args.counts.split(","))
    out = args.output_dir
    common = ["--dataset", "synthetic", "--synthetic-counts", args.counts, "--no-cache"]

    cfg = load_config(args.config, ["train.device=cpu", *args.overrides])
    synthetic = cfg.train.synthetic
    splits = synthetic_splits(
        "scene",
        counts=counts,
        tile_size=synthetic.tile_size,
        num_classes=synthetic.num_classes,
        layout=cfg.train.dataset.s2_layout,
        seed=cfg.train.seed,
        index_offset=synthetic.num_samples,  # the same held-out tiles `rsdino eval` uses
        texture_pairs=synthetic.texture_pairs,
    )
    torch.manual_seed(cfg.train.seed)  # the same initial weights train() starts from
    random_init = EvalModel(
        encoder=SSLMetaArch(cfg).teacher["encoder"].eval(),
        cfg=cfg,
        identity="random-init",
        results_uri=str(out),
        name="random_init",
        step=0,
    )
    random_reports = {
        probe: run_probe(
            probe,
            random_init,
            splits,
            RunSettings(use_cache=False, out=str(out / f"random_init.eval_{probe}.json")),
            ProbeSettings(epochs=args.epochs),
        )
        for probe in ("knn", "linear")
    }

    started = time.perf_counter()
    result = train(cfg, out, resume=False)
    train_seconds = time.perf_counter() - started
    exported = export_teacher(open_store(str(out / "checkpoints")), out / "teacher.safetensors")
    pretrained_reports = {}
    for probe, extra in (("knn", []), ("linear", ["--epochs", str(args.epochs)])):
        report_path = out / f"teacher.eval_{probe}.json"
        command = ["eval", probe, str(exported.path), *common, *extra, "--out", str(report_path)]
        if rsdino_main(command) != 0:
            raise SystemExit(f"rsdino {' '.join(command)} failed")
        pretrained_reports[probe] = json.loads(report_path.read_text())

    report = {
        "config": args.config,
        "overrides": args.overrides,
        "steps": result.final_step,
        "train_seconds": round(train_seconds, 1),
        "tiles": dict(zip(("train", "val", "test"), counts, strict=True)),
        "num_classes": synthetic.num_classes,
        "random_init": {p: summary(r) for p, r in random_reports.items()},
        "pretrained": {p: summary(r) for p, r in pretrained_reports.items()},
        "commands": [
            f"rsdino eval {p} {exported.path} {' '.join(common)}" for p in ("knn", "linear")
        ],
    }
    if synthetic.texture_pairs:
        report["knn_k20_errors"] = {
            "random_init": pair_errors(random_reports["knn"]),
            "pretrained": pair_errors(pretrained_reports["knn"]),
        }
    (out / "eval_signal.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
