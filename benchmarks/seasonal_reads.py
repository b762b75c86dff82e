"""Storage requests per sample of seasonal views: packed shards vs the GeoTIFF tree.

A seasonal sample needs a second date of its patch. Read from the SEN12MS-CR-TS tree, that is
another file per modality (twice the requests); ``rsdino data pack --seasonal-days`` stores the
second date in the sample's own record, so a chunk read brings both. Writes a tree of PATCHES
patches x 30 dates, packs it with and without seasonal views, reads one epoch of each through
the training readers, and counts the store's requests.

    python benchmarks/seasonal_reads.py [--patches 8] [--samples-per-chunk 8] [--out F.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from rsdino.data.batch_share import BatchShare
from rsdino.data.pack import pack_dataset
from rsdino.data.seasonal import SeasonalViews
from rsdino.data.sources import Sen12MSSource, store_access
from rsdino.data.storage import LocalStore
from rsdino.data.stream import ShardStream

# The test helpers own the real-layout tree writer; reuse it as it is.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from source_fixtures import write_sen12ms_time_series

DATES = tuple(
    str(datetime.date(2018, 1, 5) + datetime.timedelta(days=12 * step)) for step in range(30)
)
WINDOW = SeasonalViews(min_days_apart=30, max_days_apart=365, seed=0)
EPOCHS = 5
MAX_RATIO = 1.2  # the target: seasonal shard reads at most 1.2x single-date shard reads


def gets(store: LocalStore) -> int:
    return sum(n for (op, _), n in store.counters.snapshot()["requests"].items() if op == "get")


def tree_requests(root: Path, seasonal: bool) -> float:
    store = LocalStore(str(root))
    source = Sen12MSSource(*store_access(store))
    if seasonal:
        source.enable_seasonal_views(WINDOW)
    before = gets(store)
    for index in range(len(source)):
        source[index]
    return (gets(store) - before) / len(source)


def shard_requests(root: Path, seasonal: bool, epochs: int = EPOCHS) -> float:
    """Chunk reads per sample served over ``epochs`` epochs. The stream reads a few batches
    ahead, so the last reads may still be in flight at the end: over several epochs they
    change the figure by well under 1%."""
    store = LocalStore(str(root))
    window = (WINDOW.min_days_apart, WINDOW.max_days_apart) if seasonal else None
    stream = ShardStream(store, share=BatchShare(8), seed=0, seasonal=window)
    wanted = epochs * (stream.samples_per_epoch // 8) * 8
    before = gets(store)  # the manifest and shard indexes were read when the stream opened
    served = 0
    batches = iter(stream)
    while served < wanted:
        served += len(next(batches)["key"])
    batches.close()  # waits for the reads in flight
    return (gets(store) - before) / served


def run(workdir: Path, patches: int, samples_per_chunk: int) -> dict[str, Any]:
    tree = workdir / "tree"
    write_sen12ms_time_series(tree, DATES, patches=patches, size=64)
    for name, seasonal in (("single", None), ("seasonal", WINDOW)):
        source = Sen12MSSource(*store_access(LocalStore(str(tree))))
        if seasonal is not None:
            source.enable_seasonal_views(seasonal)
        pack_dataset(
            source,
            LocalStore(str(workdir / name)),
            samples_per_chunk=samples_per_chunk,
            description={"source": "sen12ms", "uri": str(tree)},
            seasonal=seasonal,
        )
    figures = {
        "tree_single_date": tree_requests(tree, seasonal=False),
        "tree_seasonal": tree_requests(tree, seasonal=True),
        "shards_single_date": shard_requests(workdir / "single", seasonal=False),
        "shards_seasonal": shard_requests(workdir / "seasonal", seasonal=True),
    }
    ratio = figures["shards_seasonal"] / figures["shards_single_date"]
    return {
        "samples": patches * len(DATES),
        "samples_per_chunk": samples_per_chunk,
        "requests_per_sample": {name: round(value, 4) for name, value in figures.items()},
        "seasonal_over_single_shards": round(ratio, 4),
        "seasonal_over_single_tree": round(
            figures["tree_seasonal"] / figures["tree_single_date"], 4
        ),
        "target_max_ratio": MAX_RATIO,
        "meets_target": ratio <= MAX_RATIO,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=8, help="patches of 30 dates each")
    parser.add_argument("--samples-per-chunk", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        report = run(Path(workdir), args.patches, args.samples_per_chunk)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if report["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
