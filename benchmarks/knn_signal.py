"""Learning signal: kNN accuracy of the teacher's [CLS] features, pretrained vs random init.

Pretrains the quickstart model on synthetic land-cover tiles, then classifies the dominant
land-cover class of held-out tiles (indices never seen in training) with a weighted kNN on
frozen [CLS] features. The same architecture at its random initialisation is the baseline.
With ``--config quickstart_multimodal`` the fused Sentinel-1 + Sentinel-2 encoder is measured.

    python benchmarks/knn_signal.py --output-dir runs/knn_signal
    python benchmarks/knn_signal.py --config quickstart_multimodal --output-dir runs/knn_mm
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from rsdino.config.loader import load_config
from rsdino.data.bands import BandNormalizer, band_stats
from rsdino.data.storage import open_store
from rsdino.data.synthetic import SyntheticLandCover
from rsdino.eval.features import extract_cls_features
from rsdino.eval.knn import knn_accuracy
from rsdino.export import export_teacher, load_exported_encoder
from rsdino.models.build import modalities
from rsdino.ssl.meta_arch import SSLMetaArch
from rsdino.train.loop import train


def knn_of(encoder: torch.nn.Module, cfg, n_train: int, n_test: int, k: int) -> float:
    synthetic = cfg.train.synthetic
    layout = cfg.train.dataset.s2_layout
    held_out = synthetic.num_samples  # first index after the training indices

    def split(offset: int, count: int) -> SyntheticLandCover:
        return SyntheticLandCover(
            num_samples=count,
            tile_size=synthetic.tile_size,
            num_classes=synthetic.num_classes,
            s2_layout=layout,
            seed=cfg.train.seed,
            index_offset=held_out + offset,
        )

    normalizers = {name: BandNormalizer(*band_stats(name, layout)) for name in modalities(cfg)}
    use_time = cfg.student.temporal_embedding
    train_x, train_y = extract_cls_features(
        encoder, split(0, n_train), normalizers, use_time=use_time
    )
    test_x, test_y = extract_cls_features(
        encoder, split(n_train, n_test), normalizers, use_time=use_time
    )
    return knn_accuracy(train_x, train_y, test_x, test_y, k=k, num_classes=synthetic.num_classes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/knn_signal"))
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    cfg = load_config(args.config, ["train.device=cpu", *args.overrides])
    torch.manual_seed(cfg.train.seed)  # the same initial weights train() starts from
    random_init = SSLMetaArch(cfg).teacher["encoder"]
    random_acc = knn_of(random_init, cfg, args.train_samples, args.test_samples, args.k)

    started = time.perf_counter()
    result = train(cfg, args.output_dir, resume=False)
    train_seconds = time.perf_counter() - started
    # The teacher as downstream users get it: through `rsdino export`.
    exported = export_teacher(
        open_store(str(args.output_dir / "checkpoints")), args.output_dir / "teacher.safetensors"
    )
    pretrained = load_exported_encoder(exported.path)
    pretrained_acc = knn_of(pretrained, cfg, args.train_samples, args.test_samples, args.k)

    report = {
        "config": args.config,
        "overrides": args.overrides,
        "steps": result.final_step,
        "train_seconds": round(train_seconds, 1),
        "knn_k": args.k,
        "train_samples": args.train_samples,
        "test_samples": args.test_samples,
        "num_classes": cfg.train.synthetic.num_classes,
        "knn_top1_random_init": round(random_acc, 4),
        "knn_top1_pretrained": round(pretrained_acc, 4),
        "first_total_loss": result.history[0]["total"] if result.history else None,
        "last_total_loss": result.history[-1]["total"] if result.history else None,
    }
    (args.output_dir / "knn_signal.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
