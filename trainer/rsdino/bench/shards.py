"""Synthetic tiles packed into local shards, so e2e mode reads what a packed run reads."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from rsdino.data.build import build_dataset
from rsdino.data.pack import pack_dataset
from rsdino.data.seasonal import SeasonalViews
from rsdino.data.storage import LocalStore


def pack_synthetic(cfg: DictConfig, root: Path) -> int:
    """Pack the config's synthetic world (``train.synthetic``) under ``root``; the sample count.

    ``rsdino data pack`` of the same tiles: same shard format, codec and per-chunk layout, with
    the seasonal second date in each record when ``train.views.seasonal`` is on.
    """
    seasonal = cfg.train.views.seasonal
    views = (
        SeasonalViews(seasonal.min_days_apart, seasonal.max_days_apart, cfg.train.seed)
        if seasonal.enabled
        else None
    )
    report = pack_dataset(
        build_dataset(cfg),
        LocalStore(root),
        seed=cfg.train.seed,
        description={
            "source": "synthetic",
            "num_samples": cfg.train.synthetic.num_samples,
            "s2_layout": cfg.train.dataset.s2_layout,
        },
        seasonal=views,
    )
    return report.total_samples
