"""`rsdino data pack` and `rsdino data stats`: thin layers over pack_dataset, compute_stats."""

from __future__ import annotations

import argparse
import logging

from rsdino.data.bands import S1_BANDS, S2_LAYOUTS
from rsdino.data.build import SAMPLE_SOURCES, SourceSpec, open_source
from rsdino.data.destination import check_output_folder
from rsdino.data.pack import describe_report, pack_dataset
from rsdino.data.stats import DEFAULT_STATS_KEY, compute_stats, write_stats
from rsdino.data.storage import open_store

log = logging.getLogger("rsdino")


def add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", metavar="SRC", help="dataset root: a local path or s3://bucket/prefix"
    )
    parser.add_argument(
        "--source",
        choices=SAMPLE_SOURCES,
        default="sen12ms",
        help="layout of SRC (default: %(default)s)",
    )
    parser.add_argument("--split", default="train", help="split to read (default: %(default)s)")
    parser.add_argument(
        "--layout",
        choices=("tree", "pairs"),
        default="tree",
        help="sen12ms: ROI folder tree or {split}_all.json pair list (default: %(default)s)",
    )
    parser.add_argument(
        "--s2-only", action="store_true", help="read Sentinel-2 only (sen12ms has S1 too)"
    )
    parser.add_argument(
        "--on-error",
        choices=("skip", "fail"),
        default="skip",
        help="bad tiles: leave out and count (skip) or stop (fail); default: %(default)s",
    )


def _spec(args: argparse.Namespace) -> SourceSpec:
    return SourceSpec(
        source=args.source,
        uri=args.src,
        split=args.split,
        layout=args.layout,
        on_error=args.on_error,
        multimodal=args.source == "sen12ms" and not args.s2_only,
    )


def _modalities(spec: SourceSpec) -> tuple[str, ...]:
    return ("s1", "s2") if spec.multimodal else ("s2",)


def run_pack(args: argparse.Namespace) -> int:
    spec = _spec(args)
    destination = open_store(args.dst)
    check_output_folder(args.dst, "the packed shards", destination)  # before any tile is read
    source = open_source(spec)
    s2_layout = "satlas" if spec.source == "satlas" else "sen12ms"
    report = pack_dataset(
        source,
        destination,
        samples_per_chunk=args.samples_per_chunk,
        target_shard_bytes=args.shard_mb * 2**20,
        codec=args.codec,
        seed=args.seed,
        description={
            "source": spec.source,
            "uri": spec.uri,
            "split": spec.split,
            "s2_layout": s2_layout,
            "modalities": list(_modalities(spec)),
        },
    )
    print(describe_report(report))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    spec = _spec(args)
    check_output_folder(args.out, DEFAULT_STATS_KEY)  # a pass over the data must not be lost
    source = open_source(spec)
    s2_bands = S2_LAYOUTS["satlas" if spec.source == "satlas" else "sen12ms"]
    names = {"s1": S1_BANDS, "s2": s2_bands}
    modalities = _modalities(spec)
    stats = compute_stats(
        source,
        modalities=modalities,
        band_names={name: names[name] for name in modalities},
        max_samples=args.max_samples,
        num_workers=args.workers,
    )
    write_stats(stats, args.out)
    for name, result in stats.items():
        means = ", ".join(
            f"{band}={mean:.1f}" for band, mean in zip(result.bands, result.mean, strict=True)
        )
        print(f"{name}: {result.count} pixels per band; mean {means}")
    location = f"{args.out.rstrip('/')}/{DEFAULT_STATS_KEY}"
    print(f"wrote {location}; train with train.dataset.stats={location}")
    return 0


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare datasets: pack shards, measure band statistics")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    pack = data_sub.add_parser(
        "pack",
        help="pack a source into shards for fast streaming (resumable, idempotent, verified)",
        description="Convert SRC into shards under DST (local or s3://). Rerunning skips every "
        "shard that is already complete; manifest.json is written last. DST is checked (a "
        "writable folder, or a prefix that takes a probe object) before any tile is read.",
    )
    add_source_options(pack)
    pack.add_argument("dst", metavar="DST", help="output root: a local path or s3://bucket/prefix")
    pack.add_argument(
        "--samples-per-chunk",
        type=int,
        default=8,
        help="samples per range read (default: %(default)s)",
    )
    pack.add_argument(
        "--shard-mb", type=int, default=256, help="target shard size in MiB (default: %(default)s)"
    )
    pack.add_argument(
        "--codec",
        choices=("none", "zlib"),
        default="none",
        help="array codec (default: %(default)s)",
    )
    pack.add_argument(
        "--seed", type=int, default=0, help="seed of the packing order (default: %(default)s)"
    )
    pack.set_defaults(handler=run_pack)

    stats = data_sub.add_parser(
        "stats",
        help="measure per-band mean/std (exact, streaming) and write band_stats.json",
        description="Measure per-band statistics of SRC and write band_stats.json to --out. "
        "--out is checked before the pass over the data starts.",
    )
    add_source_options(stats)
    stats.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder or s3:// prefix for band_stats.json (required: statistics belong to one "
        "source and split, so no folder is chosen for you)",
    )
    stats.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="measure a seeded subset of this many samples (default: all samples)",
    )
    stats.add_argument(
        "--workers", type=int, default=0, help="loader worker processes (default: %(default)s)"
    )
    stats.set_defaults(handler=run_stats)
