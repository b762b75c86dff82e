"""Old import path of ``rsdino.data.dataset_string``, which moved out of this torch package."""

from __future__ import annotations

from rsdino.data.dataset_string import DATASET_SOURCES, parse_dataset_string

__all__ = ["DATASET_SOURCES", "parse_dataset_string"]
