"""Options of `rsdino data pack`, `stats` and `clouds`; the handlers load when a command runs."""

from __future__ import annotations

import argparse

from rsdino.command_handler import lazy_handler
from rsdino.data.choices import ON_ERROR, SAMPLE_SOURCES, SEN12MS_LAYOUTS, SHARD_CODECS


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
        choices=SEN12MS_LAYOUTS,
        default="tree",
        help="sen12ms: ROI folder tree or {split}_all.json pair list (default: %(default)s)",
    )
    parser.add_argument(
        "--s2-only", action="store_true", help="read Sentinel-2 only (sen12ms has S1 too)"
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="skip",
        help="bad tiles: leave out and count (skip) or stop (fail); default: %(default)s",
    )


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser(
        "data", help="prepare datasets: pack shards, measure band statistics, score clouds"
    )
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
        choices=SHARD_CODECS,
        default="none",
        help="array codec (default: %(default)s)",
    )
    pack.add_argument(
        "--seed", type=int, default=0, help="seed of the packing order (default: %(default)s)"
    )
    pack.add_argument(
        "--seasonal-days",
        metavar="MIN:MAX",
        default=None,
        help="sen12ms: store each sample with a second date of its patch MIN..MAX days away "
        "(chosen with --seed), for train.views.seasonal with the same window; default: single "
        "dates",
    )
    pack.set_defaults(handler=lazy_handler("rsdino.data.commands:run_pack"))

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
    stats.set_defaults(handler=lazy_handler("rsdino.data.commands:run_stats"))

    clouds = data_sub.add_parser(
        "clouds",
        help="score each Sentinel-2 acquisition's cloud cover with s2cloudless (clouds.json)",
        description="Score every Sentinel-2 acquisition of a SEN12MS-CR-TS root with s2cloudless "
        "and write the cloud fraction and mean cloud probability per S2 key to clouds.json. "
        "Rerunning with the same detector settings scores only new keys; the destination is "
        "checked before any tile is read. Needs pip install 'rsdino[clouds]'.",
    )
    clouds.add_argument(
        "src", metavar="SRC", help="SEN12MS-CR-TS root: a local path or s3://bucket/prefix"
    )
    clouds.add_argument("--split", default="train", help="split to read (default: %(default)s)")
    clouds.add_argument(
        "--layout",
        choices=SEN12MS_LAYOUTS,
        default="tree",
        help="ROI folder tree or {split}_all.json pair list (default: %(default)s)",
    )
    clouds.add_argument(
        "--threshold",
        type=float,
        default=0.4,
        help="cloud probability above which a pixel is cloud (default: %(default)s)",
    )
    clouds.add_argument(
        "--batch", type=int, default=16, help="tiles per detector call (default: %(default)s)"
    )
    clouds.add_argument(
        "--out",
        default=None,
        metavar="URI",
        help="folder or s3:// prefix for clouds.json (default: SRC)",
    )
    clouds.add_argument(
        "--workers",
        type=int,
        default=0,
        help="threads that read and decode tiles; 0 reads in the main thread (default: "
        "%(default)s)",
    )
    clouds.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="skip",
        help="bad tiles: leave out and count (skip) or stop (fail); default: %(default)s",
    )
    clouds.set_defaults(handler=lazy_handler("rsdino.data.clouds:run_clouds"))
