"""`rsdino data pack` and `rsdino data stats`: thin layers over pack_dataset, compute_stats.

Their options are defined in ``rsdino.data.arguments``, which names these handlers lazily.
"""

from __future__ import annotations

import argparse
import logging

from rsdino.config.loader import ConfigError
from rsdino.data.band_tables import modalities_of
from rsdino.data.bands import S1_BANDS, S2_LAYOUTS
from rsdino.data.build import SourceSpec, open_source
from rsdino.data.destination import check_output_folder
from rsdino.data.pack import describe_report, pack_dataset
from rsdino.data.seasonal import SeasonalViews
from rsdino.data.stats import DEFAULT_STATS_KEY, compute_stats, write_stats
from rsdino.data.storage import open_store

log = logging.getLogger("rsdino")


def _spec(args: argparse.Namespace) -> SourceSpec:
    return SourceSpec(
        source=args.source,
        uri=args.src,
        split=args.split,
        layout=args.layout,
        on_error=args.on_error,
        multimodal=args.source == "sen12ms" and not args.s2_only,
    )


def _seasonal_views(args: argparse.Namespace) -> SeasonalViews | None:
    """``--seasonal-days MIN:MAX``: pack each sample with a second date of its patch."""
    if args.seasonal_days is None:
        return None
    if args.source != "sen12ms":
        raise ConfigError(
            f"--seasonal-days needs dated time series (--source sen12ms), not {args.source}"
        )
    low, _, high = args.seasonal_days.partition(":")
    try:
        return SeasonalViews(int(low), int(high), args.seed)
    except ValueError as exc:
        raise ConfigError(
            f"--seasonal-days {args.seasonal_days!r} must be MIN:MAX days with 0 <= MIN <= MAX"
        ) from exc


def run_pack(args: argparse.Namespace) -> int:
    spec = _spec(args)
    seasonal = _seasonal_views(args)
    destination = open_store(args.dst)
    check_output_folder(args.dst, "the packed shards", destination)  # before any tile is read
    source = open_source(spec)
    if seasonal is not None:
        source.enable_seasonal_views(seasonal)
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
            "modalities": list(modalities_of(spec.multimodal)),
        },
        seasonal=seasonal,
    )
    print(describe_report(report))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    spec = _spec(args)
    check_output_folder(args.out, DEFAULT_STATS_KEY)  # a pass over the data must not be lost
    source = open_source(spec)
    s2_bands = S2_LAYOUTS["satlas" if spec.source == "satlas" else "sen12ms"]
    names = {"s1": S1_BANDS, "s2": s2_bands}
    modalities = modalities_of(spec.multimodal)
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
