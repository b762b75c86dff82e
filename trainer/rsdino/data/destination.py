"""Checks that a command's destination can take its results, made before the work starts.

``data stats`` and ``data pack`` can run for hours and ``export`` reads a whole checkpoint; a
destination that turns out to be a file, read-only or refused by the object store must stop them
before that work, not after it. Every failure is an :class:`OutputDirError` (exit code 4) naming
the path and what to do, or the store's own :class:`StorageError` for ``s3://``.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from rsdino.data.storage import LocalStore, StorageError, Store, open_store
from rsdino.train.output_dir import OutputDirError

# Local stores hide files with this prefix from listings, so a probe is never taken for data.
PROBE_PREFIX = ".rsdino-tmp-probe-"


def _local_path(uri: str) -> Path | None:
    """The local path a destination names, or None for an object store URI."""
    scheme, separator, _ = uri.partition("://")
    if not separator:
        return Path(uri).expanduser()
    if scheme.lower() == "file":
        return Path(url2pathname(urlparse(uri).path))
    return None


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest of its parents that exists: where a write would create folders."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_local_folder(folder: Path, target: Path, what: str) -> None:
    """Create and remove a hidden file in ``folder``: the one test that every file system honours.

    ``os.access`` says yes to root on a read-only mount over NFS and to files an ACL refuses.
    """
    try:
        handle, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = "" if folder == target else f" in {folder}"
        raise OutputDirError(
            f"cannot write {what} to {target}: {reason}{where}; choose a writable folder or fix "
            "its permissions"
        ) from exc


def check_output_folder(uri: str, what: str, store: Store | None = None) -> None:
    """Fail now unless ``uri`` is a folder (existing or creatable) or prefix that takes files.

    Local: not a file, no file on the way to it, writable (a real probe file). ``s3://``: a
    0-byte probe object is written and deleted through ``store`` (the store the command will
    write with), which checks endpoint, bucket, credentials and write permission in two requests.
    """
    path = _local_path(uri)
    if path is None:
        _probe_store(store or open_store(uri), uri, what)
        return
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path} is a file, not a folder; pass a folder for {what}")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise OutputDirError(
            f"cannot create the folder {path} for {what}: {existing} is a file; pass a path "
            "that is a folder or can become one"
        )
    _probe_local_folder(existing, path, what)


def check_output_file(path: Path, what: str) -> None:
    """Fail now unless ``path`` can be written as a file: not a folder, in a writable folder."""
    if path.is_dir():
        raise OutputDirError(f"{path} is a folder; pass a file name for {what}")
    parent = Path(os.path.abspath(path)).parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise OutputDirError(
            f"cannot write {what} to {path}: {existing} is a file, not a folder; pass a path "
            "whose folders are folders"
        )
    _probe_local_folder(existing, path, what)


def _probe_store(store: Store, uri: str, what: str) -> None:
    if isinstance(store, LocalStore):  # a store opened from an unusual spelling of a path
        check_output_folder(str(store.root), what)
        return
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        store.write(key, b"")
        store.delete(key)
    except StorageError as exc:
        raise type(exc)(f"cannot write {what} to {uri}: {exc}") from exc
