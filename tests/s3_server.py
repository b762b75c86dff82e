"""Real S3 for tests: moto's server in a subprocess, and a loopback proxy that injects faults.

Nothing here mocks boto3: the store under test speaks HTTP to a real server, and the proxy breaks
that HTTP the way throttled or flaky object stores do. Test modules load the fixtures with
``pytest_plugins = ["s3_server"]``; this module has no asserts to rewrite (PYTEST_DONT_REWRITE),
which also lets them import its helpers directly.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import boto3
import pytest

from rsdino.data.storage import Store

# Hop-by-hop or recomputed headers that must not be copied from moto's answer.
_SKIPPED_HEADERS = {"connection", "transfer-encoding", "content-length", "keep-alive"}
FAULT_KINDS = ("503", "403", "drop", "truncate", "corrupt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_server(startup_timeout: float = 30.0) -> Iterator[str]:
    """Run ``python -m moto.server`` on a free loopback port; yield its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start listening in time") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class FaultyProxy:
    """Forwards HTTP to ``upstream`` but breaks requests by a fixed, repeating schedule.

    ``schedule`` is cycled over the requests whose method is in ``methods``; each entry is None
    (forward untouched) or one of FAULT_KINDS: "503" (SlowDown), "403" (AccessDenied), "drop"
    (close the connection without answering), "truncate" (send half the body of a successful
    answer, then close) or "corrupt" (flip the bits of its first byte). ``injected`` counts the
    faults actually delivered, by kind.
    """

    def __init__(
        self,
        upstream: str,
        schedule: Sequence[str | None] = (None,),
        methods: Sequence[str] = ("GET",),
    ) -> None:
        for kind in schedule:
            if kind is not None and kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault {kind!r}; choose from {FAULT_KINDS}")
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.schedule = list(schedule)
        self.methods = set(methods)
        self.injected: Counter[str] = Counter()
        self.paths: list[tuple[str, str]] = []
        # Set from the test while the proxy runs: requests whose path contains ``path_filter``
        # (and whose method is in ``methods``) wait ``delay`` seconds, and get the fault
        # ``outage`` until it is cleared or ``outage_left`` such requests have had it.
        self.path_filter = ""
        self.delay = 0.0
        self.outage: str | None = None
        self.outage_left: int | None = None
        self._scheduled = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.paths)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def next_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.paths.append((method, path))
            if method not in self.methods:
                return None
            if self.outage is not None and self.path_filter in path:
                fault = self.outage
                if self.outage_left is not None:
                    self.outage_left -= 1
                    if self.outage_left <= 0:
                        self.outage = None
                return fault
            fault = self.schedule[self._scheduled % len(self.schedule)]
            self._scheduled += 1
            return fault

    def record(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1


class _ProxyHandler(BaseHTTPRequestHandler):
    # Every answer closes its connection, so a dropped or truncated one never poisons a reuse.
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Keep pytest output clean."""

    def _relay(self) -> None:
        proxy: FaultyProxy = self.server.proxy  # type: ignore[attr-defined]
        self.close_connection = True
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fault = proxy.next_fault(self.command, self.path)
        if proxy.delay and proxy.path_filter in self.path and self.command in proxy.methods:
            time.sleep(proxy.delay)
        if fault == "drop":
            proxy.record(fault)
            return
        if fault in ("503", "403"):
            proxy.record(fault)
            code = "SlowDown" if fault == "503" else "AccessDenied"
            self._answer(int(fault), [("Content-Type", "application/xml")], _error_xml(code))
            return
        status, headers, payload = self._forward(proxy.upstream, body)
        if fault == "truncate" and status in (200, 206) and len(payload) > 1:
            proxy.record(fault)
            self._answer(status, headers, payload, cut_at=len(payload) // 2)
            return
        if fault == "corrupt" and status in (200, 206) and payload:
            proxy.record(fault)
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        self._answer(status, headers, payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

    def _forward(
        self, upstream: tuple[str, int], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*upstream, timeout=10)
        try:
            connection.request(self.command, self.path, body=body, headers=dict(self.headers))
            response = connection.getresponse()
            payload = response.read()
            headers = [
                (name, value)
                for name, value in response.getheaders()
                if name.lower() not in _SKIPPED_HEADERS
            ]
            # A HEAD answer announces the object's size without sending it.
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            headers.append(("Content-Length", length or str(len(payload))))
            return response.status, headers, payload
        finally:
            connection.close()

    def _answer(
        self,
        status: int,
        headers: list[tuple[str, str]],
        payload: bytes,
        cut_at: int | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if not any(name.lower() == "content-length" for name, _ in headers):
            self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload if cut_at is None else payload[:cut_at])


def _error_xml(code: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>injected by the test proxy</Message></Error>"
    ).encode()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for the whole test session (it takes a second or two to start)."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> str:
    """Dummy credentials and a clean S3 environment; returns the moto endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in (
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "RSDINO_S3_PATH_STYLE",
    ):
        monkeypatch.delenv(name, raising=False)
    return moto_endpoint


@pytest.fixture
def bucket(s3_env: str) -> str:
    """A fresh, empty bucket on the moto server."""
    name = f"rsdino-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def put_objects(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    """Write straight to moto with plain boto3, independently of the store under test."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)


def read_in_child(store: Store, key: str) -> tuple[bytes, dict]:
    """Runs in another process: read one object, report what that process counted."""
    return store.read(key), store.counters.snapshot()
