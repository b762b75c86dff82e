"""The cloud score file (``clouds.json``) that ``rsdino data clouds`` writes and training reads.

One home for its format, so the command that writes it and the filter that reads it cannot
disagree: ``{"version": 1, "detector": {...}, "acquisitions": {"<S2 key>": {"cloud_fraction",
"mean_probability"}}}``.
"""

from __future__ import annotations

import json
from typing import Any

from rsdino.data.storage import Store

SCORES_KEY = "clouds.json"
SCORES_VERSION = 1


def read_scores(store: Store, key: str, location: str) -> dict[str, Any] | None:
    """The score document at ``key`` of ``store``, or None when there is none; ValueError
    naming ``location`` if the file is not a score file."""
    if not store.exists(key):
        return None
    try:
        document = json.loads(store.read(key))
        valid = (
            document["version"] == SCORES_VERSION
            and isinstance(document["detector"], dict)
            and isinstance(document["acquisitions"], dict)
            and all(
                isinstance(score, dict) and isinstance(score.get("cloud_fraction"), int | float)
                for score in document["acquisitions"].values()
            )
        )
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ValueError(f"{location} is not a version {SCORES_VERSION} cloud score file")
    return document


def scores_document(detector: dict[str, Any], scores: dict[str, dict]) -> bytes:
    """The file's bytes: keys sorted, so an unchanged score set gives identical bytes."""
    document = {"version": SCORES_VERSION, "detector": detector, "acquisitions": scores}
    return json.dumps(document, indent=1, sort_keys=True).encode("utf-8")


def cloud_fractions(document: dict[str, Any]) -> dict[str, float]:
    """S2 key -> cloud fraction of a score document."""
    acquisitions = document["acquisitions"]
    return {name: float(score["cloud_fraction"]) for name, score in acquisitions.items()}
