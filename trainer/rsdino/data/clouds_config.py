"""The cloud filter's config (``train.clouds.*``), torch-free; ``data/cloud_scores.py`` reads
the scores it names and ``data/build.py`` applies the policy."""

from __future__ import annotations

from dataclasses import dataclass

from rsdino.config.component import Checks

CLOUD_POLICIES = ("drop", "sar_only", "weight")


@dataclass
class CloudsConfig:
    """What to do with cloudy Sentinel-2 acquisitions (Sen12MS-CR-TS; scores from
    ``rsdino data clouds``)."""

    max_fraction: float = 1.0
    """An acquisition whose cloud fraction is above this is cloudy; 1.0: the filter is off."""
    scores: str = ""
    """The score file (path or s3://); "": clouds.json at train.dataset.uri."""
    policy: str = "drop"
    """A cloudy acquisition is dropped (drop), kept with the student seeing its Sentinel-1 alone
    (sar_only; multimodal), or kept with every loss term of its views scaled (weight)."""
    loss_weight: float = 0.25
    """policy=weight: the scale of those loss terms, in [0, 1]."""

    def __post_init__(self) -> None:
        checks = Checks("train.clouds")
        checks.require(
            0.0 <= self.max_fraction <= 1.0,
            "max_fraction",
            "must be in [0, 1] (1: off)",
            self.max_fraction,
        )
        checks.choice("policy", self.policy, CLOUD_POLICIES)
        checks.require(
            0.0 <= self.loss_weight <= 1.0, "loss_weight", "must be in [0, 1]", self.loss_weight
        )
        checks.raise_any()
