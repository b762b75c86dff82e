"""Turn ``train.dataset`` into a dataset object."""

from __future__ import annotations

from omegaconf import DictConfig
from torch.utils.data import Dataset

from rsdino.data.sources import (
    GeoTiffFolderSource,
    ListKeys,
    ReadBytes,
    SatlasSource,
    Sen12MSSource,
    SkipBadSamples,
    store_access,
)
from rsdino.data.storage import open_store
from rsdino.data.synthetic import SyntheticLandCover
from rsdino.errors import RsdinoError


def build_dataset(cfg: DictConfig) -> Dataset:
    """The configured source; with ``on_error=skip`` bad tiles are replaced, counted and logged."""
    dataset = cfg.train.dataset
    if dataset.source == "synthetic":
        synthetic = cfg.train.synthetic
        return SyntheticLandCover(
            num_samples=synthetic.num_samples,
            tile_size=synthetic.tile_size,
            num_classes=synthetic.num_classes,
            s2_layout=dataset.s2_layout,
            seed=cfg.train.seed,
        )
    storage = cfg.train.storage
    store = open_store(
        dataset.uri,
        endpoint_url=storage.endpoint_url,
        region=storage.region,
        path_style=storage.path_style,
        max_attempts=storage.max_attempts,
    )
    try:
        source = _open_source(dataset, cfg.train.multimodal, *store_access(store))
    except ValueError as exc:
        raise RsdinoError(f"train.dataset ({dataset.source} at {dataset.uri}): {exc}") from exc
    if len(source) == 0:
        raise RsdinoError(
            f"no {dataset.source} samples found at {dataset.uri} (split {dataset.split!r}); "
            "check train.dataset.uri, split and layout"
        )
    return SkipBadSamples(source) if dataset.on_error == "skip" else source


def _open_source(
    dataset: DictConfig, multimodal: bool, list_keys: ListKeys, read_bytes: ReadBytes
) -> Dataset:
    if dataset.source == "sen12ms":
        return Sen12MSSource(
            list_keys,
            read_bytes,
            split=dataset.split,
            layout=dataset.layout,
            multimodal=multimodal,
            on_error=dataset.on_error,
        )
    elif dataset.source == "satlas":
        return SatlasSource(list_keys, read_bytes, split=dataset.split, on_error=dataset.on_error)
    elif dataset.source == "geotiff":
        return GeoTiffFolderSource(
            list_keys, read_bytes, bands=list(dataset.bands) or None, on_error=dataset.on_error
        )
    raise ValueError(f"train.dataset.source={dataset.source!r} has no builder")
