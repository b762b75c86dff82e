"""The multi-crop and photometric augmentation configs (``crops.*``, ``augment.*``).

They live apart from ``data/augment.py`` so that loading and checking a config needs no torch;
``MultiCropAugment`` takes them as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rsdino.config.component import Checks


@dataclass
class CropsConfig:
    """DINOv2 multi-crop: two global views of each sample for student and teacher, and
    ``local_crops_number`` small views for the student alone."""

    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    """Area of a global crop as a fraction of the tile, [min, max]."""
    local_crops_number: int = 8
    """Local crops per sample (0: global crops only)."""
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    """Area of a local crop as a fraction of the tile, [min, max]."""
    global_crops_size: int = 224
    """Side of a global crop in pixels, a multiple of the patch size."""
    local_crops_size: int = 96
    """Side of a local crop in pixels, a multiple of the patch size."""

    def __post_init__(self) -> None:
        checks = Checks("crops")
        for key in ("global_crops_size", "local_crops_size"):
            checks.require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        checks.require(
            self.local_crops_number >= 0,
            "local_crops_number",
            "must be >= 0",
            self.local_crops_number,
        )
        checks.interval("global_crops_scale", self.global_crops_scale, 0.0, 1.0)
        checks.interval("local_crops_scale", self.local_crops_scale, 0.0, 1.0)
        checks.raise_any()


@dataclass
class AugmentConfig:
    """Geometry and photometry drawn per view; every modality of a sample shares the geometry."""

    flip_prob: float = 0.5
    """Probability of each of the horizontal and vertical flips."""
    rotate90: bool = True
    """A random multiple-of-90-degree rotation: overhead imagery has no "up"."""
    brightness: float = 0.2
    """Additive brightness jitter, in normalised units: uniform in [-b, b]."""
    contrast: float = 0.2
    """Contrast jitter around each band's mean: a factor uniform in [1 - c, 1 + c]."""
    band_jitter: float = 0.05
    """Per-band gain jitter: a factor per band uniform in [1 - j, 1 + j]."""
    blur_prob_global: list[float] = field(default_factory=lambda: [1.0, 0.1])
    """Gaussian blur probability of global view 0 and of global view 1."""
    blur_prob_local: float = 0.5
    """Gaussian blur probability of a local view."""
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    """Blur standard deviation in pixels, drawn uniformly in [min, max]."""

    def __post_init__(self) -> None:
        checks = Checks("augment")
        checks.probability("flip_prob", self.flip_prob)
        checks.require(self.brightness >= 0.0, "brightness", "must be >= 0", self.brightness)
        checks.require(0.0 <= self.contrast <= 1.0, "contrast", "must be in [0, 1]", self.contrast)
        checks.require(
            0.0 <= self.band_jitter < 1.0, "band_jitter", "must be in [0, 1)", self.band_jitter
        )
        checks.require(
            len(self.blur_prob_global) == 2 and all(0 <= p <= 1 for p in self.blur_prob_global),
            "blur_prob_global",
            "must be two probabilities (view 0, view 1)",
            self.blur_prob_global,
        )
        checks.probability("blur_prob_local", self.blur_prob_local)
        checks.interval("blur_sigma", self.blur_sigma, 0.0, math.inf)
        checks.raise_any()
