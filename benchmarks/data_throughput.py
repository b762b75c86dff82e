"""Data path: is training GPU-bound or input-bound? Read, decode and collate rates on this host.

Writes a synthetic SEN12MS-CR-TS tree of real-size GeoTIFF pairs (256x256: Sentinel-2 13 x uint16,
Sentinel-1 2 x float32), packs it into shards, uploads tree and pack to a moto S3 server on
loopback, then measures:

1. read throughput of packed shards (ShardStream, 0 and N loader workers) and of one object per
   tile (Sen12MSSource, N workers), each from local disk and from S3;
2. the CPU cost of decoding alone, from bytes already in memory (GeoTIFF pair; shard chunk);
3. host-side CPU per sample (read + checksum + decode + collate) for packed local shards.

    python benchmarks/data_throughput.py [--pairs 512] [--workers 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import torch
from torch.utils.data import DataLoader

from rsdino.data.batch_share import BatchShare
from rsdino.data.collate import collate_samples
from rsdino.data.pack import pack_dataset
from rsdino.data.shards import decode_chunk, read_manifest, read_shard_indexes
from rsdino.data.sources import Sen12MSSource, store_access
from rsdino.data.storage import LocalStore, S3Store, Store
from rsdino.data.stream import ShardStream

# The test helpers own the moto launcher and the real-layout GeoTIFF writer; reuse them as they are.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3_server import moto_server
from source_fixtures import TRAIN_ROI, random_s1, random_s2, sen12ms_keys, write_geotiff

TILE_SIZE = 256
BUCKET = "rsdino-bench"
TREE_PREFIX = "tree"
PACK_PREFIX = "packed"
TIME_STEPS = 30  # SEN12MS-CR-TS has 30 time steps per tile; further pairs become new patches
_AWS_KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Settings from the caller's shell that would send the benchmark's requests elsewhere.
_AWS_OVERRIDES = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
DECODE_POOL_PAIRS = 32  # in-memory pairs cycled through by the decode-only measurements
DECODE_SAMPLES = 256  # samples timed per decode-only measurement (fewer if the data is smaller)
# Targets from the issue.
MAX_S3_SLOWDOWN = 1.5
MIN_HOST_SAMPLES_PER_CORE = 500.0


@dataclass(frozen=True)
class LoaderFigures:
    """One read measurement; CPU is this process plus its reaped loader workers."""

    path: str
    storage: str
    workers: int
    samples: int
    wall_s: float
    samples_per_s: float
    mb_per_s: float
    cpu_us_per_sample: float


@dataclass(frozen=True)
class DecodeFigures:
    """CPU cost of one decode step, from bytes in memory, single-threaded."""

    step: str
    samples: int
    us_per_sample: float
    samples_per_s_per_core: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512, help="synthetic Sen12MS pairs")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (N)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="passes timed per measurement")
    parser.add_argument("--samples-per-chunk", type=int, default=8)
    parser.add_argument(
        "--chunks-per-shard", type=int, default=1, help="chunks per shard object (see the notes)"
    )
    parser.add_argument("--out", type=Path, default=Path("data_throughput.json"))
    args = parser.parse_args(argv)
    sizes = (
        args.pairs,
        args.batch_size,
        args.epochs,
        args.samples_per_chunk,
        args.chunks_per_shard,
    )
    if min(sizes) < 1 or args.workers < 0:
        parser.error("sizes, counts and --epochs must be >= 1, --workers >= 0")
    return args


def pair_keys(index: int) -> tuple[str, str]:
    """The (S1, S2) tree keys of synthetic pair ``index``."""
    time_step, patch = index % TIME_STEPS, index // TIME_STEPS
    return sen12ms_keys(TRAIN_ROI, time_step, patch, "2018-01-02", "2018-01-03")


def write_tree(root: Path, pairs: int) -> None:
    """Real-layout SEN12MS-CR-TS GeoTIFF pairs of random pixels, written by parallel threads."""

    def write_pair(index: int) -> None:
        rng = np.random.default_rng(index)
        s1_key, s2_key = pair_keys(index)
        write_geotiff(root / s2_key, random_s2(rng, TILE_SIZE))
        write_geotiff(root / s1_key, random_s1(rng, TILE_SIZE))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(write_pair, range(pairs)))


def files_under(root: Path) -> dict[str, Path]:
    """Relative POSIX key -> path of every file under ``root``."""
    return {path.relative_to(root).as_posix(): path for path in root.rglob("*") if path.is_file()}


def upload(endpoint: str, root: Path, prefix: str) -> int:
    """Put every file under ``root`` into the bucket with plain boto3; returns the bytes sent."""
    client = boto3.client("s3", endpoint_url=endpoint)

    def put(item: tuple[str, Path]) -> int:
        data = item[1].read_bytes()
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{item[0]}", Body=data)
        return len(data)

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(put, files_under(root).items()))


def use_dummy_credentials(workdir: Path) -> None:
    """moto accepts any credentials; they go in a credentials file, not in AWS_ACCESS_KEY_ID.

    Keys in the environment would make rasterio build a boto3 session on every GeoTIFF open and
    distort the local figures; ``aws_keys_in_environment`` measures that case on its own.
    """
    credentials = workdir / "aws-credentials"
    credentials.write_text(
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    for name in (*_AWS_KEY_VARIABLES, *_AWS_OVERRIDES):
        os.environ.pop(name, None)
    os.environ.update(AWS_SHARED_CREDENTIALS_FILE=str(credentials), AWS_DEFAULT_REGION="us-east-1")


@contextmanager
def aws_keys_in_environment() -> Iterator[None]:
    """Dummy AWS keys in os.environ for the duration, as a job configured by env vars has them."""
    os.environ.update(dict.fromkeys(_AWS_KEY_VARIABLES, "testing"))
    try:
        yield
    finally:
        for name in _AWS_KEY_VARIABLES:
            os.environ.pop(name, None)


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def batch_bytes(batch: dict[str, Any]) -> int:
    return sum(value.nbytes for value in batch.values() if isinstance(value, torch.Tensor))


def measure_loader(
    loader: Iterable[dict[str, Any]],
    warmup_batches: int,
    measured_batches: int,
    label: tuple[str, str, int],
) -> LoaderFigures:
    """Time ``measured_batches`` after ``warmup_batches``; workers are shut down before returning.

    Wall time excludes the warm-up. CPU is this process over the measured batches plus every
    worker over its whole life (RUSAGE_CHILDREN only sees workers once they are reaped), so with
    workers it includes their start-up and warm-up: an upper bound.
    """
    children_before = children_cpu_s()
    batches = iter(loader)
    for _ in range(warmup_batches):
        next(batches)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    samples = nbytes = 0
    for _ in range(measured_batches):
        batch = next(batches)
        samples += len(batch["key"])
        nbytes += batch_bytes(batch)
    wall_s = time.perf_counter() - wall_start
    cpu_s = time.process_time() - cpu_start
    del batches, batch  # shuts the workers down and reaps them
    gc.collect()
    cpu_s += children_cpu_s() - children_before
    path, storage, workers = label
    return LoaderFigures(
        path=path,
        storage=storage,
        workers=workers,
        samples=samples,
        wall_s=wall_s,
        samples_per_s=samples / wall_s,
        mb_per_s=nbytes / 1e6 / wall_s,
        cpu_us_per_sample=cpu_s / samples * 1e6,
    )


def measure_packed(
    store: Store, storage: str, workers: int, args: argparse.Namespace
) -> LoaderFigures:
    stream = ShardStream(store, share=BatchShare(args.batch_size), seed=0)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    measured = math.ceil(args.epochs * stream.samples_per_epoch / args.batch_size)
    return measure_loader(loader, max(1, workers), measured, ("packed shards", storage, workers))


def measure_tiles(store: Store, storage: str, args: argparse.Namespace) -> LoaderFigures:
    """One GET (or file read) per GeoTIFF, in a fresh random order each epoch, as training does."""
    source = Sen12MSSource(*store_access(store))
    warmup = max(1, args.workers)
    rng = np.random.default_rng(0)
    order = rng.integers(0, len(source), warmup * args.batch_size).tolist()
    for _ in range(args.epochs):
        order += rng.permutation(len(source)).tolist()
    loader = DataLoader(
        source,
        batch_size=args.batch_size,
        sampler=order,
        num_workers=args.workers,
        collate_fn=collate_samples,
    )
    measured = math.ceil(args.epochs * len(source) / args.batch_size)
    label = ("one object per tile", storage, args.workers)
    return measure_loader(loader, warmup, measured, label)


def measure_decode(step: str, decode: Callable[[int], int], count: int) -> DecodeFigures:
    """CPU time of ``decode(i)`` (which returns how many samples it decoded) until ``count``."""
    decode(0)  # warm-up: first-call imports and allocations
    samples = call = 0
    cpu_start = time.process_time()
    while samples < count:
        samples += decode(call)
        call += 1
    us_per_sample = (time.process_time() - cpu_start) / samples * 1e6
    return DecodeFigures(step, samples, us_per_sample, 1e6 / us_per_sample)


def decode_figures(tree: Path, pack: LocalStore, pairs: int, count: int) -> list[DecodeFigures]:
    """GeoTIFF pair decode (Sen12MSSource over bytes in memory), shard chunk decode and checksum."""
    pool = range(min(pairs, DECODE_POOL_PAIRS))
    blobs = {key: (tree / key).read_bytes() for index in pool for key in pair_keys(index)}
    memory_source = Sen12MSSource(
        lambda prefix: sorted(key for key in blobs if key.startswith(prefix)), blobs.__getitem__
    )

    def decode_pair(call: int) -> int:
        memory_source[call % len(memory_source)]
        return 1

    manifest = read_manifest(pack)
    indexes = read_shard_indexes(pack, manifest)
    chunk_refs = [
        (entry["data"], meta)
        for entry, index in zip(manifest["shards"], indexes, strict=True)
        for meta in index["chunks"]
    ]
    pool_chunks = math.ceil(DECODE_POOL_PAIRS / manifest["samples_per_chunk"])
    chunks = [
        (pack.read(key, meta["offset"], meta["offset"] + meta["nbytes"]), meta)
        for key, meta in chunk_refs[:pool_chunks]
    ]

    def decode_one_chunk(call: int) -> int:
        data, meta = chunks[call % len(chunks)]
        return len(decode_chunk(data, meta))

    def checksum_one_chunk(call: int) -> int:
        data, meta = chunks[call % len(chunks)]
        zlib.crc32(data)
        return len(meta["samples"])

    pair_figures = measure_decode("GeoTIFF pair (S2 + S1)", decode_pair, count)
    with aws_keys_in_environment():
        pair_with_keys = measure_decode("GeoTIFF pair, AWS keys in env", decode_pair, count)
    return [
        pair_figures,
        pair_with_keys,
        measure_decode("shard chunk decode", decode_one_chunk, count),
        measure_decode("shard chunk CRC-32 check", checksum_one_chunk, count),
    ]


def find_run(runs: list[LoaderFigures], path: str, storage: str, workers: int) -> LoaderFigures:
    return next(r for r in runs if (r.path, r.storage, r.workers) == (path, storage, workers))


def check_targets(runs: list[LoaderFigures], workers: int) -> list[dict[str, Any]]:
    """The issue's two targets: S3 close to local for packed shards, and host CPU per sample."""
    local = find_run(runs, "packed shards", "local", workers)
    s3 = find_run(runs, "packed shards", "S3", workers)
    slowdown = local.samples_per_s / s3.samples_per_s
    host = 1e6 / find_run(runs, "packed shards", "local", 0).cpu_us_per_sample
    return [
        {
            "name": f"packed S3 within {MAX_S3_SLOWDOWN}x of packed local ({workers} workers)",
            "measured": slowdown,
            "unit": "x slower",
            "threshold": MAX_S3_SLOWDOWN,
            "passed": slowdown <= MAX_S3_SLOWDOWN,
        },
        {
            "name": f"host-side >= {MIN_HOST_SAMPLES_PER_CORE:.0f} samples/s per core",
            "measured": host,
            "unit": "samples/s per core",
            "threshold": MIN_HOST_SAMPLES_PER_CORE,
            "passed": host >= MIN_HOST_SAMPLES_PER_CORE,
        },
    ]


def notes(chunks_per_shard: int) -> list[str]:
    return [
        "'S3' is moto, a Python server, on loopback, sharing this host's cores with the loader: "
        "it measures the boto3 client path plus moto's overhead, not a real object store's "
        "latency or bandwidth. moto's own CPU is not counted in the CPU figures.",
        f"Shards hold {chunks_per_shard} chunk(s) each (rsdino's default is ~256 MiB, about 14 "
        "chunks of 8 pairs) because moto copies the whole object to serve each range GET, a cost "
        "real S3 does not have; one chunk per object keeps moto's cost to the bytes requested.",
        "'local' files were just written, so they are read from the page cache: a best case "
        "for local disk.",
        "MB/s counts the tensor bytes delivered in batches (1 MB = 10^6 bytes).",
        "CPU per sample is process CPU time (all threads) plus reaped loader workers "
        "(RUSAGE_CHILDREN); with workers it includes their start-up and warm-up, so it is an "
        "upper bound. Host-side figure: packed local shards, 0 workers, warm-up excluded.",
        "Decode figures are single-threaded CPU time from bytes already in memory. The S3 "
        "credentials come from a file; 'AWS keys in env' decodes with AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY set, where rasterio builds a boto3 session on every GeoTIFF open.",
        "torch runs one intra-op thread in this process, as it does in loader workers.",
        "Timings from a shared machine are noisy; rerun before drawing fine distinctions.",
    ]


def format_report(results: dict[str, Any]) -> str:
    settings, data = results["settings"], results["data"]
    lines = [
        f"rsdino data path: {settings['pairs']} Sen12MS pairs ({TILE_SIZE}x{TILE_SIZE}: S2 13 x "
        f"uint16, S1 2 x float32; {data['sample_mb']:.2f} MB/sample), batch "
        f"{settings['batch_size']}, {settings['epochs']} epochs timed, "
        f"{settings['cpu_cores']} CPU cores",
        "",
        "Read throughput (warm-up excluded)",
        f"{'path':<20} {'storage':<8} {'workers':>7} {'samples':>8} {'samples/s':>10} "
        f"{'MB/s':>8} {'CPU us/sample':>14}",
    ]
    for run in results["throughput"]:
        lines.append(
            f"{run['path']:<20} {run['storage']:<8} {run['workers']:>7} {run['samples']:>8} "
            f"{run['samples_per_s']:>10.1f} {run['mb_per_s']:>8.1f} "
            f"{run['cpu_us_per_sample']:>14.0f}"
        )
    lines += ["", "Decode only (bytes in memory)", f"{'step':<30} {'us/sample':>10} {'/s/core':>9}"]
    for step in results["decode"]:
        lines.append(
            f"{step['step']:<30} {step['us_per_sample']:>10.0f} "
            f"{step['samples_per_s_per_core']:>9.0f}"
        )
    host = results["host_side"]
    lines += [
        "",
        f"Host-side, packed local (read + CRC-32 + decode + collate, 0 workers): "
        f"{host['cpu_us_per_sample']:.0f} us/sample = {host['samples_per_s_per_core']:.0f} "
        "samples/s per core",
        "",
        "Targets",
    ]
    for target in results["targets"]:
        verdict = "PASS" if target["passed"] else "FAIL"
        lines.append(
            f"{target['name']:<56} {target['measured']:>8.2f} {target['unit']:<19} {verdict}"
        )
    lines += ["", "Notes", *(f"- {note}" for note in results["notes"])]
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace, workdir: Path, endpoint: str) -> dict[str, Any]:
    """Write, pack and upload the data, then take every measurement; returns the JSON report."""
    tree, pack_dir = workdir / TREE_PREFIX, workdir / PACK_PREFIX
    setup_s: dict[str, float] = {}
    started = time.perf_counter()
    write_tree(tree, args.pairs)
    setup_s["write_tree"] = time.perf_counter() - started
    started = time.perf_counter()
    pack_dataset(
        Sen12MSSource(*store_access(LocalStore(tree))),
        LocalStore(pack_dir),
        samples_per_chunk=args.samples_per_chunk,
        chunks_per_shard=args.chunks_per_shard,
        description={"benchmark": "synthetic SEN12MS-CR-TS"},
    )
    setup_s["pack"] = time.perf_counter() - started
    started = time.perf_counter()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    uploaded = upload(endpoint, tree, TREE_PREFIX) + upload(endpoint, pack_dir, PACK_PREFIX)
    setup_s["upload"] = time.perf_counter() - started

    def s3(prefix: str) -> S3Store:
        return S3Store(BUCKET, prefix, endpoint_url=endpoint, path_style=True)

    stores = {
        "local": (LocalStore(tree), LocalStore(pack_dir)),
        "S3": (s3(TREE_PREFIX), s3(PACK_PREFIX)),
    }
    runs = [
        measure_packed(pack_store, storage, workers, args)
        for storage, (_, pack_store) in stores.items()
        for workers in sorted({0, args.workers})
    ]
    runs += [
        measure_tiles(tree_store, storage, args) for storage, (tree_store, _) in stores.items()
    ]
    decode_samples = min(DECODE_SAMPLES, args.epochs * args.pairs)
    decode = decode_figures(tree, LocalStore(pack_dir), args.pairs, decode_samples)
    host = find_run(runs, "packed shards", "local", 0)
    return {
        "settings": {
            **{name: value for name, value in vars(args).items() if name != "out"},
            "tile_size": TILE_SIZE,
            "cpu_cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
        },
        "data": {
            "sample_mb": (13 * 2 + 2 * 4) * TILE_SIZE**2 / 1e6,
            "uploaded_mb": uploaded / 1e6,
            "pack_mb": sum(path.stat().st_size for path in files_under(pack_dir).values()) / 1e6,
            "setup_s": setup_s,
        },
        "throughput": [asdict(run) for run in runs],
        "decode": [asdict(step) for step in decode],
        "host_side": {
            "cpu_us_per_sample": host.cpu_us_per_sample,
            "samples_per_s_per_core": 1e6 / host.cpu_us_per_sample,
        },
        "targets": check_targets(runs, args.workers),
        "notes": notes(args.chunks_per_shard),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Loader workers run with one intra-op thread; so does this process, so that the 0-worker
    # figures count work rather than OpenMP threads spinning at a barrier on a busy host.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="rsdino-data-bench-") as workdir:
        use_dummy_credentials(Path(workdir))
        with moto_server() as endpoint:
            results = run_benchmark(args, Path(workdir), endpoint)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(format_report(results))
    print(f"\nJSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
