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
