"""Storage layer against real servers: a local directory, moto over HTTP, and a faulty proxy."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import socket
from pathlib import Path

import pytest
from s3_server import FaultyProxy, free_port, put_objects, read_in_child

from rsdino.data import storage
from rsdino.data.storage import LocalStore, S3Store, StorageError, open_store

pytest_plugins = ["s3_server"]

DIGITS = b"0123456789"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> storage.Store:
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    bucket = request.getfixturevalue("bucket")
    endpoint = request.getfixturevalue("s3_env")
    return open_store(f"s3://{bucket}/root", endpoint_url=endpoint, path_style=True)


def test_local_and_s3_stores_behave_the_same(store: storage.Store) -> None:
    store.write("digits.bin", DIGITS)
    store.write("tiles/a.tif", b"A" * 3)
    store.write("tiles/sub/b.tif", b"")
    store.write("tiles_extra.txt", b"x")

    assert store.list() == ["digits.bin", "tiles/a.tif", "tiles/sub/b.tif", "tiles_extra.txt"]
    assert store.list("tiles/") == ["tiles/a.tif", "tiles/sub/b.tif"]
    assert store.list("tiles") == ["tiles/a.tif", "tiles/sub/b.tif", "tiles_extra.txt"]
    assert store.list("tiles/s") == ["tiles/sub/b.tif"]
    assert store.list("nothing/") == []

    assert store.read("digits.bin") == DIGITS
    assert store.read("digits.bin", 2, 5) == b"234"
    assert store.read("digits.bin", start=7) == b"789"
    assert store.read("digits.bin", end=3) == b"012"
    assert store.read("digits.bin", 4, 4) == b""
    assert store.read("digits.bin", 8, 100) == b"89"
    assert store.read("digits.bin", 20) == b""
    assert store.read("tiles/sub/b.tif") == b""

    assert store.size("digits.bin") == 10
    assert store.size("tiles/sub/b.tif") == 0
    assert store.exists("tiles/a.tif")
    assert not store.exists("tiles/missing.tif")
    assert not store.exists("tiles")

    order = ["tiles_extra.txt", "digits.bin", "tiles/a.tif", "tiles_extra.txt"]
    assert list(store.read_many(order, max_workers=3)) == [
        ("tiles_extra.txt", b"x"),
        ("digits.bin", DIGITS),
        ("tiles/a.tif", b"AAA"),
        ("tiles_extra.txt", b"x"),
    ]

    store.write("digits.bin", b"new")
    assert store.read("digits.bin") == b"new"

    counts = store.counters.snapshot()
    # 10 + 3 + 3 + 3 + 0 + 2 + 0 + 0 (reads) + 1 + 10 + 3 + 1 (read_many) + 3 (re-read)
    assert counts["bytes_read"] == 39
    assert counts["bytes_written"] == 10 + 3 + 0 + 1 + 3
    assert counts["requests"][("put", "ok")] == 5
    assert counts["requests"][("head", "404")] == 2
    assert counts["errors"] == {}


@pytest.mark.parametrize("key", ["", "/abs.tif", "../escape.tif", "a/../../b.tif"])
def test_keys_must_stay_inside_the_root(store: storage.Store, key: str) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        store.read(key)


def test_missing_object_is_a_clear_error_that_is_not_retried(bucket: str, s3_env: str) -> None:
    with FaultyProxy(s3_env) as proxy:
        store = open_store(f"s3://{bucket}/data", endpoint_url=proxy.url, path_style=True)
        with pytest.raises(StorageError, match=rf"s3://{bucket}/data/absent\.tif does not exist"):
            store.read("absent.tif")
        assert proxy.request_count == 1
    assert store.counters.snapshot()["requests"] == {("get", "404"): 1}
    assert store.counters.retries == {}
    assert store.counters.errors == {"get": 1}


def test_local_missing_file_names_the_path(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(StorageError, match=rf"{tmp_path / 'gone.tif'} does not exist"):
        store.read("gone.tif")
    with pytest.raises(StorageError, match="does not exist"):
        store.size("gone.tif")
    with pytest.raises(StorageError, match="is not a directory"):
        LocalStore(tmp_path / "no_such_dir").list()


def test_reads_survive_throttling_drops_and_truncation(bucket: str, s3_env: str) -> None:
    rng = random.Random(0)
    objects = {f"tile_{i:02d}.bin": rng.randbytes(rng.randint(64, 4096)) for i in range(50)}
    put_objects(s3_env, bucket, {f"s2/{key}": data for key, data in objects.items()})

    # Every third GET is broken, cycling through the three transient failure kinds.
    schedule = [None, None, "503", None, None, "drop", None, None, "truncate"]
    with FaultyProxy(s3_env, schedule) as proxy:
        store = S3Store(bucket, "s2", endpoint_url=proxy.url, path_style=True, base_delay=0.001)
        keys = sorted(objects)
        got = {key: store.read(key) for key in keys[:20]}
        got.update(store.read_many(keys[20:], max_workers=4))
        total_requests = proxy.request_count

    assert got == objects
    counts = store.counters.snapshot()
    assert proxy.injected["503"] > 0
    assert proxy.injected["drop"] > 0
    assert proxy.injected["truncate"] > 0
    assert counts["requests"] == {
        ("get", "ok"): 50,
        ("get", "503"): proxy.injected["503"],
        ("get", "connection"): proxy.injected["drop"],
        ("get", "incomplete"): proxy.injected["truncate"],
    }
    assert counts["retries"] == {"get": total_requests - 50}
    assert total_requests - 50 == sum(proxy.injected.values())
    assert counts["errors"] == {}
    assert counts["bytes_read"] == sum(len(data) for data in objects.values())


def test_body_damaged_in_transit_fails_its_checksum_and_is_read_again(
    bucket: str, s3_env: str
) -> None:
    put_objects(s3_env, bucket, {"c.bin": DIGITS})  # boto3 stores a CRC32 with the object
    with FaultyProxy(s3_env, ["corrupt", None]) as proxy:
        store = S3Store(bucket, endpoint_url=proxy.url, path_style=True, base_delay=0)
        assert store.read("c.bin") == DIGITS
        assert proxy.injected["corrupt"] == 1
    assert store.counters.snapshot()["requests"] == {("get", "checksum"): 1, ("get", "ok"): 1}


def test_gives_up_after_max_attempts_with_the_key_and_advice(bucket: str, s3_env: str) -> None:
    put_objects(s3_env, bucket, {"hot.tif": b"data"})
    with FaultyProxy(s3_env, ["503"]) as proxy:
        store = open_store(
            f"s3://{bucket}", endpoint_url=proxy.url, path_style=True, max_attempts=3, base_delay=0
        )
        with pytest.raises(StorageError, match=r"hot\.tif failed after 3 attempts") as error:
            store.read("hot.tif")
        assert proxy.request_count == 3
    assert "SlowDown" in str(error.value)
    assert "raise max_attempts" in str(error.value)
    assert store.counters.snapshot()["requests"] == {("get", "503"): 3}
    assert store.counters.retries == {"get": 2}
    assert store.counters.errors == {"get": 1}


def test_access_denied_names_credentials_and_is_not_retried(bucket: str, s3_env: str) -> None:
    with FaultyProxy(s3_env, ["403"], methods=["HEAD"]) as proxy:
        store = open_store(f"s3://{bucket}", endpoint_url=proxy.url, path_style=True)
        with pytest.raises(StorageError, match="check the credentials"):
            store.size("secret.tif")
        assert proxy.request_count == 1
    assert store.counters.snapshot()["requests"] == {("head", "403"): 1}


def test_unreachable_endpoint_fails_with_a_clear_error(s3_env: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = open_store("s3://bucket/x", endpoint_url=endpoint, max_attempts=3, base_delay=0.01)
    with pytest.raises(StorageError, match="failed after 3 attempts") as error:
        store.list()
    assert endpoint in str(error.value)
    assert store.counters.snapshot()["requests"] == {("list", "connection"): 3}


def test_silent_endpoint_times_out_instead_of_hanging(s3_env: str) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = S3Store(
            "bucket",
            endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            max_attempts=2,
            base_delay=0,
            read_timeout=0.3,
        )
        with pytest.raises(StorageError, match="failed after 2 attempts"):
            store.exists("tile.tif")
    assert store.counters.snapshot()["requests"] == {("head", "timeout"): 2}


def test_endpoint_region_and_path_style_come_from_the_environment(
    bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with FaultyProxy(s3_env) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)  # the S3-specific one wins
        monkeypatch.setenv("AWS_REGION", "eu-central-1")
        monkeypatch.setenv("RSDINO_S3_PATH_STYLE", "1")
        store = open_store(f"s3://{bucket}/pre")
        store.write("k.bin", b"abc")
        assert store.read("k.bin") == b"abc"
        paths = [path for _, path in proxy.paths]

    assert (store.endpoint_url, store.region, store.path_style) == (proxy.url, "eu-central-1", True)
    assert paths[0].startswith(f"/{bucket}/pre/k.bin")  # path-style: the bucket is in the path
    assert len(paths) == 2

    explicit = open_store(
        f"s3://{bucket}", endpoint_url=s3_env, region="us-west-2", path_style=False
    )
    assert (explicit.endpoint_url, explicit.region, explicit.path_style) == (
        s3_env,
        "us-west-2",
        False,
    )
    monkeypatch.setenv("RSDINO_S3_PATH_STYLE", "0")
    assert open_store(f"s3://{bucket}").path_style is None  # botocore picks the addressing


def test_store_pickles_into_a_spawned_process(bucket: str, s3_env: str) -> None:
    put_objects(s3_env, bucket, {"p/tile.bin": b"payload"})
    store = open_store(f"s3://{bucket}/p", endpoint_url=s3_env, path_style=True)
    assert store.read("tile.bin") == b"payload"  # the parent's client exists before pickling
    copy = pickle.loads(pickle.dumps(store))
    assert copy.uri == store.uri
    assert copy.counters.snapshot()["requests"] == {}

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        data, child_counts = pool.apply(read_in_child, (store, "tile.bin"))
    assert data == b"payload"
    assert child_counts["requests"] == {("get", "ok"): 1}
    assert store.counters.snapshot()["requests"] == {("get", "ok"): 1}


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_forked_process_gets_its_own_client_and_counters(bucket: str, s3_env: str) -> None:
    put_objects(s3_env, bucket, {"f.bin": b"forked"})
    store = open_store(f"s3://{bucket}", endpoint_url=s3_env, path_style=True)
    assert store.read("f.bin") == b"forked"
    with multiprocessing.get_context("fork").Pool(1) as pool:
        data, child_counts = pool.apply(read_in_child, (store, "f.bin"))
    assert data == b"forked"
    assert child_counts["requests"] == {("get", "ok"): 1}


def test_local_write_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"file://{tmp_path}")
    assert isinstance(store, LocalStore)
    store.write("dir/tile.bin", b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match="No space left"):
        store.write("dir/tile.bin", b"new contents")
    with pytest.raises(StorageError, match="No space left"):
        store.write("dir/fresh.bin", b"never visible")

    assert os.listdir(tmp_path / "dir") == ["tile.bin"]
    assert (tmp_path / "dir" / "tile.bin").read_bytes() == b"old"
    assert store.list() == ["dir/tile.bin"]
    assert store.counters.errors == {"put": 2}


def test_open_store_picks_the_backend_from_the_uri(tmp_path: Path) -> None:
    local = open_store(str(tmp_path))
    assert isinstance(local, LocalStore) and local.root == tmp_path
    s3 = open_store("s3://my-bucket/a/b/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.root_prefix, s3.uri) == ("my-bucket", "a/b/", "s3://my-bucket/a/b/")
    with pytest.raises(StorageError, match=r"use one of s3://, file://"):
        open_store("gs://bucket/data")
    with pytest.raises(StorageError, match="needs a bucket"):
        open_store("s3:///data")


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    random.seed(1)
    for attempt, cap in [(0, 0.1), (1, 0.2), (3, 0.8), (4, 1.0), (10, 1.0)]:
        delays = [storage._backoff_delay(attempt, 0.1, 1.0) for _ in range(500)]
        assert all(0.0 <= delay <= cap for delay in delays)
        assert max(delays) > 0.95 * cap  # the whole interval is used, not just its low end
        assert min(delays) < 0.05 * cap
