"""Real Sentinel data sources that read through two callables, so any storage can back them.

Every source takes `list_keys(prefix) -> sorted keys` (relative to the dataset root) and
`read_bytes(key) -> bytes`; `store_access` takes both from a local or S3 store.
"""

from __future__ import annotations

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
from rsdino.data.storage import Store
from rsdino.data.worker_stats import error_batch, in_loader_worker
from rsdino.errors import RsdinoError

__all__ = [
    "BadDataPolicy",
    "BandCountError",
    "CorruptFileError",
    "DataError",
    "GeoTiffFolderSource",
    "ListKeys",
    "MissingPartnerError",
    "NanTileError",
    "ReadBytes",
    "SatlasSource",
    "Sen12MSSource",
    "ShapeMismatchError",
    "SkipBadSamples",
    "SkipSample",
    "parse_dataset_string",
    "store_access",
]


def store_access(store: Store) -> tuple[ListKeys, ReadBytes]:
    """The (list_keys, read_bytes) pair every source takes, from a local or S3 store.

    Bound methods of a store pickle with it, so sources built on them work in loader workers.
    """
    return store.list, store.read


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
        try:
            for offset in range(size):
                try:
                    return self.source[(index + offset) % size]
                except SkipSample:
                    continue
            raise RsdinoError(
                f"all {size} samples of the dataset are bad; see the logged data errors"
            )
        except RsdinoError as error:
            if not in_loader_worker():
                raise
            return error_batch(error)
