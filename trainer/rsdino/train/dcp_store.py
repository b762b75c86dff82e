"""torch.distributed.checkpoint (DCP) reading and writing through rsdino's :class:`Store`.

DCP's own ``FileSystemWriter``/``FileSystemReader`` do the planning, the per-rank files and the
``.metadata`` file; they reach storage through a small file-system interface, which this module
implements on top of :class:`~rsdino.data.storage.Store`. Checkpoints written to ``s3://`` thus
get the same retries, backoff, request counters and error messages as the training data, without
a second S3 client stack (s3fs/aiobotocore pins botocore against boto3; s3torchconnector needs
AWS's CRT client and cannot be pointed at a fault-injecting proxy in tests).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager

from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystemBase

from rsdino.data.storage import Store

# Reads go through a buffer of this size: torch.load issues many small reads per tensor record,
# and each unbuffered read would be one ranged GET.
_READ_BUFFER = 8 * 1024 * 1024


class _RangedObjectReader(io.RawIOBase):
    """A seekable read-only view of one stored object, fetched in byte ranges on demand."""

    def __init__(self, store: Store, key: str) -> None:
        self._store = store
        self._key = key
        self._size = store.size(key)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        end = min(self._position + len(buffer), self._size)
        if end <= self._position:
            return 0
        data = self._store.read(self._key, self._position, end)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class StoreFileSystem(FileSystemBase):
    """DCP's file-system interface over a :class:`Store`; paths are keys relative to its root."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        key = os.fspath(path)
        if mode == "rb":
            with io.BufferedReader(_RangedObjectReader(self.store, key), _READ_BUFFER) as reader:
                yield reader
        elif mode == "wb":
            with self.store.open_writer(key) as writer:
                yield writer  # type: ignore[misc]
        else:
            raise ValueError(f"unsupported stream mode {mode!r}")

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{os.fspath(path).rstrip('/')}/{suffix}"

    def init_path(self, path: str | os.PathLike) -> str:
        return os.fspath(path)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        # Only DCP's small .metadata file is renamed; object stores have no rename.
        self.store.write(os.fspath(new_path), self.store.read(os.fspath(path)))
        self.store.delete(os.fspath(path))

    def mkdir(self, path: str | os.PathLike) -> None:
        """Object stores have no directories; local stores create parents on write."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return not os.fspath(checkpoint_id).startswith("/")

    def exists(self, path: str | os.PathLike) -> bool:
        return self.store.exists(os.fspath(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.store.delete(os.fspath(path))


class StoreWriter(FileSystemWriter):
    """Writes one checkpoint (a key prefix in ``store``) as DCP's per-rank files + metadata.

    ``sync_files`` is off because a completed PUT is already durable and a store stream has no
    file descriptor to fsync.
    """

    def __init__(self, store: Store, checkpoint_id: str, cache_staged_state_dict: bool) -> None:
        super().__init__(
            checkpoint_id,
            sync_files=False,
            cache_staged_state_dict=cache_staged_state_dict,
        )
        self.fs = StoreFileSystem(store)
        self.path = self.fs.init_path(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return StoreFileSystem.validate_checkpoint_id(checkpoint_id)


class StoreReader(FileSystemReader):
    """Reads a checkpoint written by :class:`StoreWriter` (or DCP's own writer) from ``store``."""

    def __init__(self, store: Store, checkpoint_id: str) -> None:
        super().__init__(checkpoint_id)
        self.fs = StoreFileSystem(store)
        self.path = self.fs.init_path(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return StoreFileSystem.validate_checkpoint_id(checkpoint_id)
