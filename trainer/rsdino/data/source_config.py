"""Configs of where samples come from (``train.dataset.*``, ``train.storage.*``,
``train.synthetic.*``), torch-free. Checks that need another section (band counts against
``student.in_chans``, multimodal pairs) are in ``config/validate.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

from rsdino.config.component import Checks
from rsdino.data.band_tables import S2_LAYOUTS
from rsdino.data.choices import ON_ERROR, SEN12MS_LAYOUTS, SOURCES

# Sources whose files fix the Sentinel-2 band layout.
_SOURCE_LAYOUTS = {"sen12ms": "sen12ms", "satlas": "satlas"}


@dataclass
class DatasetConfig:
    """Which samples a run trains on."""

    source: str = "synthetic"
    """synthetic (built in), sen12ms, satlas, geotiff or shards."""
    uri: str = ""
    """Local path or s3://bucket/prefix of the dataset root."""
    split: str = "train"
    """sen12ms: train, val, test or all; satlas: the split folder."""
    s2_layout: str = "sen12ms"
    """sen12ms (13 bands) or satlas (9 bands)."""
    layout: str = "tree"
    """sen12ms: tree (ROI folders) or pairs ({split}_all.json)."""
    bands: list[int] = field(default_factory=list)
    """geotiff: 1-based bands in s2_layout order to train on; empty: all."""
    on_error: str = "skip"
    """A bad tile: skip (count, log once, serve the next) or fail."""
    stats: str = ""
    """Band statistics from `rsdino data stats` (path or s3://); "": the defaults."""

    def __post_init__(self) -> None:
        checks = Checks("train.dataset")
        checks.choice("source", self.source, SOURCES)
        checks.choice("on_error", self.on_error, ON_ERROR)
        checks.choice("s2_layout", self.s2_layout, tuple(S2_LAYOUTS))
        if self.source != "synthetic":
            rule = (
                f"is needed by train.dataset.source={self.source!r} (a path or s3://bucket/prefix)"
            )
            checks.require(bool(self.uri), "uri", rule)
        expected = _SOURCE_LAYOUTS.get(self.source)
        checks.require(
            expected is None or self.s2_layout == expected,
            "s2_layout",
            f"does not match train.dataset.source={self.source!r}, which stores the {expected} "
            f"band layout; set train.dataset.s2_layout={expected}",
            self.s2_layout,
        )
        if self.source == "sen12ms":
            checks.choice("layout", self.layout, SEN12MS_LAYOUTS)
        checks.raise_any()


@dataclass
class StorageConfig:
    """S3 access; a null value is taken from the AWS_* environment variables."""

    endpoint_url: str | None = None
    """e.g. http://minio:9000 (AWS_ENDPOINT_URL)."""
    region: str | None = None
    """AWS_REGION / AWS_DEFAULT_REGION."""
    path_style: bool | None = None
    """True for MinIO/Ceph (RSDINO_S3_PATH_STYLE=1)."""
    max_attempts: int = 8
    """Attempts per request on throttling, 5xx answers and dropped connections."""

    def __post_init__(self) -> None:
        checks = Checks("train.storage")
        checks.require(self.max_attempts >= 1, "max_attempts", "must be >= 1", self.max_attempts)
        checks.raise_any()


@dataclass
class SyntheticConfig:
    """The built-in synthetic land-cover world (``train.dataset.source=synthetic``)."""

    num_samples: int = 100000
    """Size of one epoch of synthetic tiles."""
    tile_size: int = 256
    """Tile side in pixels, like Sen12MS-CR-TS tiles."""
    num_classes: int = 6
    """Land-cover classes in the generated maps."""
    texture_pairs: bool = False
    """Classes in pairs that share one spectrum and backscatter and differ only in texture (smooth
    or coarse-grained), in scene-like tiles where one class covers most of the tile: the mean
    spectrum no longer tells the dominant class and labels are rarely near ties, so the
    learning-signal benchmark measures what pretraining adds beyond a random projection of it."""

    def __post_init__(self) -> None:
        checks = Checks("train.synthetic")
        checks.require(self.num_samples > 0, "num_samples", "must be > 0", self.num_samples)
        checks.require(self.tile_size >= 8, "tile_size", "must be >= 8", self.tile_size)
        # The upper bound is the world's class table, which SyntheticLandCover checks.
        checks.require(self.num_classes >= 2, "num_classes", "must be >= 2", self.num_classes)
        checks.raise_any()
