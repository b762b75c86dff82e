"""Turn ``train.dataset`` into a dataset object."""

from __future__ import annotations

from omegaconf import DictConfig
from torch.utils.data import Dataset

from rsdino.data.synthetic import SyntheticLandCover


def build_dataset(cfg: DictConfig) -> Dataset:
    source = cfg.train.dataset.source
    if source == "synthetic":
        synthetic = cfg.train.synthetic
        return SyntheticLandCover(
            num_samples=synthetic.num_samples,
            tile_size=synthetic.tile_size,
            num_classes=synthetic.num_classes,
            s2_layout=cfg.train.dataset.s2_layout,
            seed=cfg.train.seed,
        )
    raise ValueError(f"train.dataset.source={source!r} is not supported; use 'synthetic'")
