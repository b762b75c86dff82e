"""Seasonal views (``train.views.seasonal``): how far apart the two dates of a sample may be.

Sources that know dates (Sen12MS-CR-TS time series, the synthetic world's seasons) take this to
serve each sample with a second date; the augmentation then cuts the second global crop from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsdino.config.component import Checks

SEASONAL_LOCALS = ("same", "any")


@dataclass(frozen=True)
class SeasonalViews:
    """Second dates between ``min_days_apart`` and ``max_days_apart`` days away, chosen as a
    function of ``seed`` and the sample (the same every epoch, rank and loader worker)."""

    min_days_apart: int
    max_days_apart: int
    seed: int

    def __post_init__(self) -> None:
        if not 0 <= self.min_days_apart <= self.max_days_apart:
            raise ValueError(
                f"need 0 <= min_days_apart <= max_days_apart, got {self.min_days_apart} and "
                f"{self.max_days_apart}"
            )


@dataclass
class SeasonalViewsConfig:
    """``train.views.seasonal``: the second global crop from another date of the same patch
    (Sen12MS-CR-TS: its ~30 acquisitions a year), with its own day of year."""

    enabled: bool = False
    """Serve each sample with a second date (sources with dated time series only)."""
    min_days_apart: int = 30
    """The second date is this many days away or more..."""
    max_days_apart: int = 365
    """...and at most this many; a sample without such a date keeps one date."""
    locals: str = "same"
    """Local crops from the first date (same), or from either date, drawn per crop (any)."""

    def __post_init__(self) -> None:
        checks = Checks("train.views.seasonal")
        checks.choice("locals", self.locals, SEASONAL_LOCALS)
        checks.require(
            0 <= self.min_days_apart <= self.max_days_apart,
            "min_days_apart",
            f"must be in [0, max_days_apart={self.max_days_apart}]",
            self.min_days_apart,
        )
        checks.raise_any()
