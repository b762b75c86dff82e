"""Turn ``train.dataset`` (or the equivalent command-line options) into datasets and stores."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from rsdino.data.bands import S2_LAYOUTS
from rsdino.data.choices import SAMPLE_SOURCES
from rsdino.data.cloud_scores import SCORES_KEY, cloud_fractions, read_scores
from rsdino.data.clouds_config import CloudsConfig
from rsdino.data.seasonal import SeasonalViews
from rsdino.data.source_config import DatasetConfig, StorageConfig
from rsdino.data.sources import (
    GeoTiffFolderSource,
    SatlasSource,
    Sen12MSSource,
    SkipBadSamples,
    store_access,
)
from rsdino.data.storage import Store, open_store
from rsdino.data.synthetic import SyntheticLandCover
from rsdino.errors import ExitCode, RsdinoError


class DatasetError(RsdinoError):
    """The configured dataset cannot be opened as that source, or holds no samples."""

    exit_code = ExitCode.DATA


@dataclass(frozen=True)
class SourceSpec:
    """Where a sample source lives and how to read it (``train.dataset`` without training keys)."""

    source: str
    uri: str
    split: str = "train"
    layout: str = "tree"
    bands: list[int] = field(default_factory=list)
    s2_layout: str = "sen12ms"  # geotiff: files without ``bands`` must have its band count
    on_error: str = "skip"
    multimodal: bool = True
    storage: dict = field(default_factory=dict)  # endpoint_url, region, path_style, max_attempts

    @classmethod
    def from_config(
        cls, dataset: DatasetConfig, storage: StorageConfig, *, multimodal: bool
    ) -> SourceSpec:
        """The spec of ``train.dataset``, read through ``train.storage``."""
        return cls(
            source=dataset.source,
            uri=dataset.uri,
            split=dataset.split,
            layout=dataset.layout,
            bands=list(dataset.bands),
            s2_layout=dataset.s2_layout,
            on_error=dataset.on_error,
            multimodal=multimodal,
            storage={
                "endpoint_url": storage.endpoint_url,
                "region": storage.region,
                "path_style": storage.path_style,
                "max_attempts": storage.max_attempts,
            },
        )

    def open_store(self) -> Store:
        return open_store(self.uri, **self.storage)


def open_source(spec: SourceSpec) -> Dataset:
    """The raw sample source (bad samples raise ``SkipSample`` under the skip policy)."""
    if spec.source not in SAMPLE_SOURCES:
        raise RsdinoError(f"source {spec.source!r} is not one of {', '.join(SAMPLE_SOURCES)}")
    list_keys, read_bytes = store_access(spec.open_store())
    try:
        if spec.source == "sen12ms":
            source = Sen12MSSource(
                list_keys,
                read_bytes,
                split=spec.split,
                layout=spec.layout,
                multimodal=spec.multimodal,
                on_error=spec.on_error,
            )
        elif spec.source == "satlas":
            source = SatlasSource(list_keys, read_bytes, split=spec.split, on_error=spec.on_error)
        else:
            source = GeoTiffFolderSource(
                list_keys,
                read_bytes,
                bands=spec.bands or None,
                on_error=spec.on_error,
                band_count=None if spec.bands else len(S2_LAYOUTS[spec.s2_layout]),
            )
    except ValueError as exc:
        raise DatasetError(f"{spec.source} dataset at {spec.uri}: {exc}") from exc
    if len(source) == 0:
        raise DatasetError(
            f"no {spec.source} samples found at {spec.uri} (split {spec.split!r}); "
            "check the uri, split and layout"
        )
    return source


def build_dataset(cfg: DictConfig) -> Dataset:
    """The map-style training dataset; with ``on_error=skip`` bad tiles are replaced and counted.

    Real sources are always wrapped in ``SkipBadSamples``: under ``fail`` it skips nothing, but it
    is where a loader worker's error is turned into a batch the training process re-raises.
    """
    dataset: DatasetConfig = OmegaConf.to_object(cfg.train.dataset)
    seasonal = cfg.train.views.seasonal
    views = (
        SeasonalViews(seasonal.min_days_apart, seasonal.max_days_apart, cfg.train.seed)
        if seasonal.enabled
        else None
    )
    if dataset.source == "synthetic":
        synthetic = cfg.train.synthetic
        world = SyntheticLandCover(
            num_samples=synthetic.num_samples,
            tile_size=synthetic.tile_size,
            num_classes=synthetic.num_classes,
            s2_layout=dataset.s2_layout,
            seed=cfg.train.seed,
            texture_pairs=synthetic.texture_pairs,
        )
        if views is not None:
            world.enable_seasonal_views(views)
        return world
    storage: StorageConfig = OmegaConf.to_object(cfg.train.storage)
    spec = SourceSpec.from_config(dataset, storage, multimodal=cfg.train.multimodal)
    source = open_source(spec)
    clouds: CloudsConfig = OmegaConf.to_object(cfg.train.clouds)
    if clouds.max_fraction < 1:
        drop_cloudy(source, spec, clouds)
    if views is not None:
        source.enable_seasonal_views(views)  # after the cloud filter: partners are clear ones
    return SkipBadSamples(source)


def drop_cloudy(source: Sen12MSSource, spec: SourceSpec, clouds: CloudsConfig) -> None:
    """Leave out the acquisitions scored cloudier than ``clouds.max_fraction`` (``drop``), or
    mark them so the student sees their Sentinel-1 alone (``sar_only``) or their loss terms are
    scaled (``weight``).

    Every kept key must have a score: an unscored acquisition could be as cloudy as any, so the
    run stops naming it rather than train on it. The count goes to the start line and metrics
    (:func:`cloudy_left_out`).
    """
    location = clouds.scores or f"{spec.uri.rstrip('/')}/{SCORES_KEY}"
    folder, _, name = location.rpartition("/")
    try:
        document = read_scores(open_store(folder or ".", **spec.storage), name, location)
    except ValueError as exc:
        raise DatasetError(f"train.clouds: {exc}; rerun `rsdino data clouds`") from exc
    if document is None:
        raise DatasetError(
            f"train.clouds: no cloud score file at {location}; run `rsdino data clouds "
            f"{spec.uri} --split {spec.split}` first, or set train.clouds.scores"
        )
    fractions = cloud_fractions(document)
    unscored = [key for key in source.keys if key not in fractions]
    if unscored:
        raise DatasetError(
            f"train.clouds: {len(unscored)} of {len(source)} acquisitions have no score in "
            f"{location}, e.g. {unscored[0]}; rerun `rsdino data clouds {spec.uri} --split "
            f"{spec.split}` (it scores only the new ones)"
        )
    cloudy = {key for key in source.keys if fractions[key] > clouds.max_fraction}
    if clouds.policy in ("sar_only", "weight"):  # kept, flagged for the training step
        source.mark_cloudy(cloudy)
        return
    total = len(source)
    source.cloudy_left_out = source.keep_only(lambda key: key not in cloudy)
    if len(source) == 0:
        raise DatasetError(
            f"train.clouds.max_fraction={clouds.max_fraction} leaves none of the {total} "
            f"acquisitions at {spec.uri}; raise it"
        )


def cloudy_left_out(dataset: object) -> int:
    """How many acquisitions ``train.clouds`` left out of ``dataset`` (0 without the filter)."""
    return getattr(getattr(dataset, "source", dataset), "cloudy_left_out", 0)


def cloudy_marked(dataset: object) -> int:
    """How many acquisitions ``train.clouds`` kept but flagged (``sar_only``, ``weight``)."""
    return len(getattr(getattr(dataset, "source", dataset), "cloudy", None) or ())
