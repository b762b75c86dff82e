"""The names the data config keys and the ``rsdino data`` options accept, importable without torch.

``config/validate.py``, the command-line parsers and the torch-side readers take these tuples
from here, so a new source or policy is added in one place.
"""

from __future__ import annotations

# Sources a file-backed reader exists for (``rsdino data pack/stats --source``).
SAMPLE_SOURCES: tuple[str, ...] = ("sen12ms", "satlas", "geotiff")
# Everything ``train.dataset.source`` accepts: the readers, the in-memory world and packed shards.
SOURCES: tuple[str, ...] = ("synthetic", *SAMPLE_SOURCES, "shards")
# How a Sen12MS root is organised: the ROI folder tree or a {split}_all.json pair list.
SEN12MS_LAYOUTS: tuple[str, ...] = ("tree", "pairs")
# What a reader does with a bad tile: leave it out and count it, or stop.
ON_ERROR: tuple[str, ...] = ("skip", "fail")
# How packed shards store their arrays (``rsdino data pack --codec``).
SHARD_CODECS: tuple[str, ...] = ("none", "zlib")
