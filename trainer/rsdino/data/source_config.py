"""Configs of where samples come from that need no other section to check
(``train.storage.*``, ``train.synthetic.*``), torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from rsdino.config.component import Checks


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

    def __post_init__(self) -> None:
        checks = Checks("train.synthetic")
        checks.require(self.num_samples > 0, "num_samples", "must be > 0", self.num_samples)
        checks.require(self.tile_size >= 8, "tile_size", "must be >= 8", self.tile_size)
        # The upper bound is the world's class table, which SyntheticLandCover checks.
        checks.require(self.num_classes >= 2, "num_classes", "must be >= 2", self.num_classes)
        checks.raise_any()
