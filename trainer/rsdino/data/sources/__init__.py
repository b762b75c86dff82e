"""Real Sentinel data sources that read through two callables, so any storage can back them.

Every source takes `list_keys(prefix) -> sorted keys` (relative to the dataset root) and
`read_bytes(key) -> bytes`; `local_access` builds both for a local folder.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from rsdino.data.sources.dataset_string import parse_dataset_string
from rsdino.data.sources.decode import (
    BadDataPolicy,
    BandCountError,
    CorruptFileError,
    DataError,
    ListKeys,
    MissingPartnerError,
    NanTileError,
    ReadBytes,
    ShapeMismatchError,
    SkipSample,
)
from rsdino.data.sources.geotiff import GeoTiffFolderSource
from rsdino.data.sources.satlas import SatlasSource
from rsdino.data.sources.sen12ms import Sen12MSSource
from rsdino.errors import RsdinoError

__all__ = [
    "BadDataPolicy",
    "BandCountError",
    "CorruptFileError",
    "DataError",
    "GeoTiffFolderSource",
    "ListKeys",
    "LocalFolder",
    "MissingPartnerError",
    "NanTileError",
    "ReadBytes",
    "SatlasSource",
    "Sen12MSSource",
    "ShapeMismatchError",
    "SkipBadSamples",
    "SkipSample",
    "local_access",
    "parse_dataset_string",
]


class LocalFolder:
    """`list_keys` and `read_bytes` of a local folder; keys are POSIX paths relative to `root`.

    A class rather than closures so that sources built on it pickle into DataLoader workers.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise RsdinoError(
                f"dataset root {self.root} is not a directory; check the dataset path"
            )

    def list_keys(self, prefix: str) -> list[str]:
        # Walk only the deepest folder the prefix names, then filter by the full prefix.
        start = self.root / prefix.rpartition("/")[0]
        if not start.is_dir():
            return []
        paths = (path for path in start.rglob("*") if path.is_file())
        keys = (path.relative_to(self.root).as_posix() for path in paths)
        return sorted(key for key in keys if key.startswith(prefix))

    def read_bytes(self, key: str) -> bytes:
        return (self.root / key).read_bytes()


def local_access(root: Path) -> tuple[ListKeys, ReadBytes]:
    """The (list_keys, read_bytes) pair every source takes, for a local folder."""
    folder = LocalFolder(root)
    return folder.list_keys, folder.read_bytes


class SkipBadSamples(Dataset):
    """Serves the next good sample in place of one the source skips, so every index stays valid.

    A skipped index i is replaced by the first good one of i + 1, i + 2, ... (wrapping around),
    which keeps the replacement deterministic for a given index.
    """

    def __init__(self, source: Dataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        size = len(self.source)
        if not 0 <= index < size:
            raise IndexError(f"index {index} out of range for {size} samples")
        for offset in range(size):
            try:
                return self.source[(index + offset) % size]
            except SkipSample:
                continue
        raise RsdinoError(f"all {size} samples of the dataset are bad; see the logged data errors")
