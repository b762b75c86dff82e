"""One small interface over local directories and S3-compatible object storage.

Training reads Sentinel tiles from many nodes at once, so S3 access must survive throttling, 5xx
answers and dropped connections. The retry loop lives here, not in botocore, so that every
attempt, retry and final failure is counted in :class:`StorageCounters` and every error that
reaches the user names the object and what to do about it.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar, cast
from urllib.parse import urlparse
from urllib.request import url2pathname

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    ConnectTimeoutError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from rsdino.data.read_ahead import ordered_map
from rsdino.errors import ExitCode, RsdinoError

T = TypeVar("T")
log = logging.getLogger(__name__)

SUPPORTED_SCHEMES = ("s3://", "file://", "a plain local path")
# Error codes S3-compatible servers use for "slow down", sometimes with a 400 status.
_THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}
_TRANSIENT_STATUSES = {"connection", "timeout", "incomplete", "checksum"}
# Local writes go to a hidden sibling first; list() never shows these half-written files.
_TEMP_PREFIX = ".rsdino-tmp-"


class StorageError(RsdinoError):
    """A storage operation failed for good; the message names the object and the fix."""

    exit_code = ExitCode.STORAGE


class StorageUnavailableError(StorageError):
    """The store kept failing transiently (5xx, throttling, network) through every retry."""

    exit_code = ExitCode.UNAVAILABLE


@dataclass
class StorageCounters:
    """What this process asked of its storage: cumulative, safe to update from many threads."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_request(self, operation: str, status: str) -> None:
        with self._lock:
            self.requests[operation, status] = self.requests.get((operation, status), 0) + 1

    def count_retry(self, operation: str) -> None:
        with self._lock:
            self.retries[operation] = self.retries.get(operation, 0) + 1

    def count_error(self, operation: str) -> None:
        with self._lock:
            self.errors[operation] = self.errors.get(operation, 0) + 1

    def count_bytes(self, *, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written

    def reset(self) -> None:
        """Back to zero: a forked loader worker must not report its parent's requests again."""
        with self._lock:
            self.requests, self.retries, self.errors = {}, {}, {}
            self.bytes_read = self.bytes_written = 0

    def snapshot(self) -> dict[str, Any]:
        """A plain copy that later requests do not change, for metrics and tests."""
        with self._lock:
            return {
                "requests": dict(self.requests),
                "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written,
                "retries": dict(self.retries),
                "errors": dict(self.errors),
            }


class Store(Protocol):
    """Keyed bytes under one root; keys are relative POSIX-style paths."""

    uri: str

    @property
    def counters(self) -> StorageCounters: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes: ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def write(self, key: str, data: bytes) -> None: ...

    def open_writer(self, key: str) -> AbstractContextManager[BinaryIO]: ...

    def delete(self, key: str) -> None: ...

    def read_many(self, keys: list[str], max_workers: int = 8) -> Iterator[tuple[str, bytes]]: ...


def _check_key(key: str) -> None:
    """Keys stay inside the store root, on every backend alike."""
    parts = key.split("/")
    if not key or key.startswith("/") or ".." in parts:
        raise StorageError(
            f"invalid storage key {key!r}: use a relative path without '..', e.g. 'tiles/0001.tif'"
        )


def _check_range(start: int | None, end: int | None) -> int:
    """The effective start of a byte range [start, end); a range past the end reads as empty."""
    first = start or 0
    if first < 0 or (end is not None and end < first):
        raise ValueError(f"invalid byte range [{start}, {end}): need 0 <= start <= end")
    return first


def _read_in_order(
    read: Callable[[str], bytes], keys: list[str], max_workers: int
) -> Iterator[tuple[str, bytes]]:
    """Read ahead in parallel, a bounded window at a time, yielding in the order of ``keys``."""
    return ordered_map(lambda key: (key, read(key)), keys, max_workers, "rsdino-read")


class _StoreBase:
    """Per-process state (counters, lock, clients) that is rebuilt after fork or unpickling."""

    uri: str

    def __init__(self) -> None:
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._counters = StorageCounters()

    def _follow_fork(self) -> None:
        if os.getpid() != self._pid:
            self._reset_process_state()

    @property
    def counters(self) -> StorageCounters:
        self._follow_fork()
        return self._counters

    def __getstate__(self) -> dict[str, Any]:
        # Only configuration travels to worker processes; they count and connect on their own.
        state = self.__dict__.copy()
        for name in ("_pid", "_lock", "_counters", "_client"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(_StoreBase):
    """A directory on a local or shared filesystem; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.uri = self.root.as_uri()
        super().__init__()

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def _fail(self, operation: str, key: str, exc: OSError) -> StorageError:
        path = self.root / key
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            status, message = "404", f"{path} does not exist (or is not a file)"
        elif isinstance(exc, PermissionError):
            status, message = "403", f"permission denied on {path}; check the file permissions"
        else:
            status, message = type(exc).__name__, f"{operation} {path} failed: {exc}"
        self.counters.count_request(operation, status)
        self.counters.count_error(operation)
        return StorageError(message)

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            self.counters.count_request("list", "404")
            self.counters.count_error("list")
            raise StorageError(f"the storage root {self.root} is not a directory; check the path")
        # Only walk the part of the tree the prefix can match.
        start = self.root / prefix.rpartition("/")[0]
        keys = []
        for directory, _, files in os.walk(start):
            for name in files:
                key = (Path(directory) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix) and not name.startswith(_TEMP_PREFIX):
                    keys.append(key)
        self.counters.count_request("list", "ok")
        return sorted(keys)

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        first = _check_range(start, end)
        path = self._path(key)
        try:
            with open(path, "rb") as file:
                file.seek(first)
                data = file.read() if end is None else file.read(end - first)
        except OSError as exc:
            raise self._fail("get", key, exc) from exc
        self.counters.count_request("get", "ok")
        self.counters.count_bytes(read=len(data))
        return data

    def read_many(self, keys: list[str], max_workers: int = 8) -> Iterator[tuple[str, bytes]]:
        return _read_in_order(self.read, keys, max_workers)

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            if not path.is_file():
                raise FileNotFoundError(path)
            size = path.stat().st_size
        except OSError as exc:
            raise self._fail("head", key, exc) from exc
        self.counters.count_request("head", "ok")
        return size

    def exists(self, key: str) -> bool:
        found = self._path(key).is_file()
        self.counters.count_request("head", "ok" if found else "404")
        return found

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        temp = path.with_name(f"{_TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise self._fail("put", key, exc) from exc
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self.counters.count_request("put", "ok")
        self.counters.count_bytes(written=len(data))

    @contextmanager
    def open_writer(self, key: str) -> Iterator[BinaryIO]:
        """A file that appears under ``key`` complete (fsync + rename) when the block succeeds."""
        path = self._path(key)
        temp = path.with_name(f"{_TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "xb") as file:
                yield cast(BinaryIO, file)
            _fsync_path(temp)  # the writer may have closed the file itself
            written = temp.stat().st_size
            os.replace(temp, path)
        except OSError as exc:
            raise self._fail("put", key, exc) from exc
        finally:
            temp.unlink(missing_ok=True)
        self.counters.count_request("put", "ok")
        self.counters.count_bytes(written=written)

    def delete(self, key: str) -> None:
        """Remove ``key`` (absent is fine) and the directories it leaves empty."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            for parent in path.relative_to(self.root).parents[:-1]:
                (self.root / parent).rmdir()
        except OSError as exc:
            if path.exists():
                raise self._fail("delete", key, exc) from exc
            # a parent still holds other files: it stays
        self.counters.count_request("delete", "ok")


class _IncompleteBodyError(Exception):
    """The body ended before Content-Length bytes arrived: a dropped connection, so retry."""


def _status_of(exc: Exception) -> str:
    """The counter label of a failed attempt: the HTTP status, or the kind of network failure."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status) if status else exc.response.get("Error", {}).get("Code", "unknown")
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        return "timeout"
    if isinstance(exc, (IncompleteReadError, ResponseStreamingError, _IncompleteBodyError)):
        return "incomplete"
    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return "connection"
    if isinstance(exc, FlexibleChecksumError):
        return "checksum"  # bytes damaged in transit: another attempt will likely be clean
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return "credentials"
    return type(exc).__name__


def _is_transient(exc: Exception, status: str) -> bool:
    if status in _TRANSIENT_STATUSES:
        return True
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        return code in _THROTTLING_CODES or status == "429" or status.startswith("5")
    return False


def _backoff_delay(attempt: int, base_delay: float, max_delay: float) -> float:
    """Full jitter: spreads the retries of many workers hitting the same throttled bucket."""
    return random.uniform(0.0, min(max_delay, base_delay * 2**attempt))


class S3Store(_StoreBase):
    """Objects under ``s3://bucket/prefix`` on AWS S3 or any S3-compatible server."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool | None = None,
        max_attempts: int = 8,
        base_delay: float = 0.1,
        max_delay: float = 5.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        if not bucket:
            raise StorageError("an S3 URI needs a bucket: use s3://BUCKET/optional/prefix")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.bucket = bucket
        self.root_prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.root_prefix}"
        self.endpoint_url = endpoint_url
        self.region = region
        self.path_style = path_style
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        super().__init__()

    def _reset_process_state(self) -> None:
        super()._reset_process_state()
        self._client: Any = None

    def _s3(self) -> Any:
        """This process's client, built on first use: boto3 clients must not cross a fork."""
        self._follow_fork()
        with self._lock:
            if self._client is None:
                addressing = {None: "auto", True: "path", False: "virtual"}[self.path_style]
                config = Config(
                    # One attempt per call: our loop retries, so it can count and back off.
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    max_pool_connections=32,
                    s3={"addressing_style": addressing},
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
                )
            return self._client

    def _describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.root_prefix}{key}"

    def _request(
        self,
        operation: str,
        key: str,
        action: Callable[[Any], T],
        fallbacks: dict[str, T] | None = None,
    ) -> T:
        """Run ``action(client)`` with retries; ``fallbacks`` maps a final status to a result."""
        last_error = ""
        for attempt in range(self.max_attempts):
            try:
                result = action(self._s3())
            except (ClientError, BotoCoreError, _IncompleteBodyError) as exc:
                status = _status_of(exc)
                self.counters.count_request(operation, status)
                if fallbacks and status in fallbacks:
                    return fallbacks[status]
                if not _is_transient(exc, status):
                    self.counters.count_error(operation)
                    raise self._permanent_error(operation, key, status, exc) from exc
                last_error = f"{status}: {exc}"
                if attempt + 1 < self.max_attempts:
                    self.counters.count_retry(operation)
                    time.sleep(_backoff_delay(attempt, self.base_delay, self.max_delay))
            else:
                self.counters.count_request(operation, "ok")
                return result
        self.counters.count_error(operation)
        endpoint = self.endpoint_url or "the default AWS endpoint"
        raise StorageUnavailableError(
            f"{operation} {self._describe(key)} failed after {self.max_attempts} attempts "
            f"(last error {last_error}); check the endpoint {endpoint} and the network, "
            "or raise max_attempts"
        )

    def _permanent_error(
        self, operation: str, key: str, status: str, exc: Exception
    ) -> StorageError:
        target = self._describe(key)
        if status == "404":
            return StorageError(f"{target} does not exist; check the bucket, prefix and key")
        if status in ("403", "credentials"):
            return StorageError(
                f"{operation} {target} was refused ({exc}); check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "AWS_SHARED_CREDENTIALS_FILE) and the bucket permissions"
            )
        return StorageError(f"{operation} {target} failed and is not retryable ({status}: {exc})")

    def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        token: str | None = None
        while True:
            page = self._list_page(prefix, token)
            for item in page.get("Contents", []):
                key = item["Key"][len(self.root_prefix) :]
                if not key.endswith("/"):  # "folder" markers made by consoles are not objects
                    keys.append(key)
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]

    def _list_page(self, prefix: str, token: str | None) -> dict[str, Any]:
        params = {"Bucket": self.bucket, "Prefix": self.root_prefix + prefix}
        if token is not None:
            params["ContinuationToken"] = token
        return self._request("list", prefix, lambda client: client.list_objects_v2(**params))

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        first = _check_range(start, end)
        _check_key(key)
        if end == first:
            return b""
        params = {"Bucket": self.bucket, "Key": self.root_prefix + key}
        if first or end is not None:
            params["Range"] = f"bytes={first}-{'' if end is None else end - 1}"

        def get(client: Any) -> bytes:
            response = client.get_object(**params)
            data = response["Body"].read()
            if len(data) != response["ContentLength"]:
                raise _IncompleteBodyError(
                    f"received {len(data)} of {response['ContentLength']} bytes"
                )
            return data

        # 416: the range starts past the end, which reads as empty like a local file.
        data = self._request("get", key, get, fallbacks={"416": b""})
        self.counters.count_bytes(read=len(data))
        return data

    def read_many(self, keys: list[str], max_workers: int = 8) -> Iterator[tuple[str, bytes]]:
        return _read_in_order(self.read, keys, max_workers)

    def size(self, key: str) -> int:
        _check_key(key)
        params = {"Bucket": self.bucket, "Key": self.root_prefix + key}
        return self._request("head", key, lambda client: client.head_object(**params))[
            "ContentLength"
        ]

    def exists(self, key: str) -> bool:
        _check_key(key)
        params = {"Bucket": self.bucket, "Key": self.root_prefix + key}
        return self._request(
            "head", key, lambda client: bool(client.head_object(**params)), {"404": False}
        )

    def write(self, key: str, data: bytes) -> None:
        _check_key(key)
        params = {"Bucket": self.bucket, "Key": self.root_prefix + key, "Body": data}
        self._request("put", key, lambda client: client.put_object(**params))
        self.counters.count_bytes(written=len(data))

    @contextmanager
    def open_writer(self, key: str) -> Iterator[BinaryIO]:
        """A stream uploaded in parts; the object appears only when the block succeeds.

        A checkpoint shard can be several GB, more than one PUT takes (5 GB) and more than is
        worth holding in memory twice, so data goes up in ``part_size`` pieces as it is written.
        """
        _check_key(key)
        upload = _MultipartUpload(self, key)
        try:
            yield cast(BinaryIO, upload)
            upload.complete()
        except BaseException:
            upload.abort()
            raise

    def delete(self, key: str) -> None:
        _check_key(key)
        params = {"Bucket": self.bucket, "Key": self.root_prefix + key}
        self._request("delete", key, lambda client: client.delete_object(**params), {"404": None})


class _MultipartUpload:
    """The write side of :meth:`S3Store.open_writer`: buffers one part, uploads it, repeats.

    Objects smaller than one part go up as a single PUT. ``close`` is a no-op so that writers
    that close what they write to (torch.distributed.checkpoint does) leave the commit to the
    ``with`` block.
    """

    part_size = 64 * 1024 * 1024  # S3 allows 5 MiB .. 5 GiB per part and 10,000 parts

    def __init__(self, store: S3Store, key: str) -> None:
        self._store = store
        self._key = key
        self._object = {"Bucket": store.bucket, "Key": store.root_prefix + key}
        self._buffer = bytearray()
        self._written = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        self._written += len(data)
        while len(self._buffer) >= self.part_size:
            self._upload_part(bytes(self._buffer[: self.part_size]))
            del self._buffer[: self.part_size]
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        """Parts go up as they fill; the last one waits for :meth:`complete`."""

    def close(self) -> None:
        """See the class docstring: completion belongs to the ``with`` block."""

    def _upload_part(self, data: bytes) -> None:
        store, key = self._store, self._key
        if self._upload_id is None:
            response = store._request(
                "put", key, lambda client: client.create_multipart_upload(**self._object)
            )
            self._upload_id = response["UploadId"]
        number = len(self._parts) + 1
        params = {**self._object, "UploadId": self._upload_id, "PartNumber": number, "Body": data}
        response = store._request("put", key, lambda client: client.upload_part(**params))
        self._parts.append({"ETag": response["ETag"], "PartNumber": number})
        store.counters.count_bytes(written=len(data))

    def complete(self) -> None:
        if self._upload_id is None:
            self._store.write(self._key, bytes(self._buffer))
            return
        if self._buffer:
            self._upload_part(bytes(self._buffer))
            self._buffer.clear()
        params = {
            **self._object,
            "UploadId": self._upload_id,
            "MultipartUpload": {"Parts": self._parts},
        }
        self._store._request(
            "put", self._key, lambda client: client.complete_multipart_upload(**params)
        )

    def abort(self) -> None:
        """Best effort: a failed abort leaves parts that the bucket's lifecycle rules expire."""
        if self._upload_id is None:
            return
        params = {**self._object, "UploadId": self._upload_id}
        try:
            self._store._request(
                "put", self._key, lambda client: client.abort_multipart_upload(**params)
            )
        except StorageError as exc:
            log.warning("could not abort the upload of %s: %s", self._key, exc)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    path_style: bool | None = None,
    max_attempts: int = 8,
    base_delay: float = 0.1,
    max_delay: float = 5.0,
) -> Store:
    """The store for ``s3://bucket/prefix``, ``file:///path`` or a plain path.

    S3 settings not given here come from the environment (AWS_ENDPOINT_URL_S3 or
    AWS_ENDPOINT_URL, AWS_REGION or AWS_DEFAULT_REGION, RSDINO_S3_PATH_STYLE=1 for MinIO/Ceph);
    credentials follow boto3's usual chain. Servers that reject boto3's default upload checksums
    (older MinIO/Ceph) work with AWS_REQUEST_CHECKSUM_CALCULATION=when_required.
    """
    scheme, separator, rest = uri.partition("://")
    if not separator:
        return LocalStore(uri)
    if scheme.lower() == "file":
        return LocalStore(url2pathname(urlparse(uri).path))
    if scheme.lower() != "s3":
        raise StorageError(
            f"unsupported storage URI {uri!r}: use one of {', '.join(SUPPORTED_SCHEMES)}"
        )
    bucket, _, prefix = rest.partition("/")
    env = os.environ
    return S3Store(
        bucket,
        prefix,
        endpoint_url=endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        path_style=path_style
        if path_style is not None
        else _env_flag("RSDINO_S3_PATH_STYLE") or None,
        max_attempts=max_attempts,
        base_delay=base_delay,
        max_delay=max_delay,
    )
