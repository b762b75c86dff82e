"""Seasonal views (``train.views.seasonal``): how far apart the two dates of a sample may be.

Sources that know dates (Sen12MS-CR-TS time series, the synthetic world's seasons) take this to
serve each sample with a second date; the augmentation then cuts the second global crop from it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
