"""The periodic evaluation config (``evaluation.*``), torch-free; ``train/periodic_eval.py``
runs the kNN it describes."""

from __future__ import annotations

from dataclasses import dataclass, field

from rsdino.config.component import Checks

PERIODIC_EVAL_DATASETS = ("synthetic", "eurosat")


@dataclass
class EvaluationConfig:
    """kNN of the teacher on held-out labelled data during training."""

    eval_period_iterations: int = 0
    """Every N steps and at the last step; 0: off."""
    dataset: str = "synthetic"
    """synthetic: unseen tiles of the train.synthetic world (train.dataset.source synthetic
    only); eurosat: class folders of 13-band GeoTIFFs."""
    uri: str = ""
    """eurosat: local path or s3:// prefix of the class folders."""
    split_dir: str = ""
    """eurosat: folder with train.txt/val.txt; "": a seeded split by class."""
    val_fraction: float = 0.2
    """eurosat seeded split: share of each class used as queries."""
    synthetic_counts: list[int] = field(default_factory=lambda: [256, 128])
    """synthetic: memory-bank and query tiles."""
    tile_size: int = 0
    """eurosat: the tiles' side, checked (0: 64); synthetic: side drawn (0: the training one)."""
    ks: list[int] = field(default_factory=lambda: [10, 20])
    """Neighbour counts; one rsdino_eval_knn_accuracy{k} sample each."""
    temperature: float = 0.07
    """Temperature of the similarity-weighted vote (DINOv2's)."""
    batch_size: int = 64
    """Feature extraction batch per rank."""

    def __post_init__(self) -> None:
        checks = Checks("evaluation")
        checks.require(
            self.eval_period_iterations >= 0,
            "eval_period_iterations",
            "must be >= 0 (0: off)",
            self.eval_period_iterations,
        )
        checks.choice("dataset", self.dataset, PERIODIC_EVAL_DATASETS)
        counts = self.synthetic_counts
        checks.require(
            len(counts) == 2 and min(counts) >= 1,
            "synthetic_counts",
            "must be [memory-bank tiles, query tiles], each >= 1",
            counts,
        )
        checks.require(
            0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)", self.val_fraction
        )
        checks.require(
            self.tile_size >= 0, "tile_size", "must be >= 0 (0: the default)", self.tile_size
        )
        checks.require(
            len(self.ks) > 0 and min(self.ks) >= 1, "ks", "must list neighbour counts >= 1", self.ks
        )
        checks.require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        checks.require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        if self.eval_period_iterations > 0:
            self._check_dataset_keys(checks)
        checks.raise_any()

    def _check_dataset_keys(self, checks: Checks) -> None:
        """Keys the chosen dataset needs, and keys it would ignore."""
        if self.dataset == "synthetic":
            for key in ("uri", "split_dir"):
                rule = "does not apply to evaluation.dataset=synthetic"
                checks.require(not getattr(self, key), key, rule)
        elif self.dataset == "eurosat":
            rule = "is needed by evaluation.dataset=eurosat (a path or s3://)"
            checks.require(bool(self.uri), "uri", rule)
