"""``rsdino data pack``: write a source's samples into verified shards, resumably.

Samples go in a seeded random permutation of the source indices, so every chunk mixes tiles from
all over the dataset and a training job that reads whole chunks still sees a well-mixed stream.
Each shard covers a contiguous range of that permutation ("positions") and records it in its
index, together with the pack settings and the samples the source skipped. That makes packing
resumable without the source: a shard whose index matches the settings and whose bytes match the
recorded sha256 is kept as it is, and the next shard starts where its range ends.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from rsdino.data.band_tables import MODALITIES
from rsdino.data.bands import S1_BANDS, S2_LAYOUTS
from rsdino.data.choices import SHARD_CODECS
from rsdino.data.read_ahead import ordered_map
from rsdino.data.seasonal import SeasonalViews
from rsdino.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_KEY,
    assemble_chunk,
    assemble_shard,
    encode_sample,
    read_json,
    sha256_hex,
    shard_data_key,
    shard_index_key,
    shard_name,
    to_json_bytes,
    write_verified,
)
from rsdino.data.sources import SkipSample
from rsdino.data.storage import Store
from rsdino.errors import RsdinoError

Record = tuple[bytes, dict[str, Any]]


@dataclass(frozen=True)
class PackReport:
    """What one pack run did; a rerun over a finished dataset writes 0 shards and skips them all."""

    uri: str
    shards_written: int
    shards_skipped: int
    total_samples: int
    skipped_samples: int
    skipped_by_kind: dict[str, int]
    total_bytes: int
    # Samples the source left out of its index (e.g. an S1 tile without its S2 partner): never
    # read, so in no shard's skipped list, but just as absent from the packed dataset.
    dropped_at_index: dict[str, int] = field(default_factory=dict)


def pack_dataset(
    source: Dataset,
    dst: Store,
    *,
    samples_per_chunk: int = 8,
    chunks_per_shard: int | None = None,
    target_shard_bytes: int = 256 * 2**20,
    codec: str = "none",
    seed: int = 0,
    description: dict[str, Any],
    read_workers: int = 8,
    seasonal: SeasonalViews | None = None,
) -> PackReport:
    """Pack ``source`` into shards under ``dst`` and write ``manifest.json`` last.

    ``chunks_per_shard`` defaults to what fits ``target_shard_bytes`` at the size of the first
    sample. ``description`` (JSON-serialisable) is stored in the manifest as the source's
    description. ``read_workers`` threads read the source ahead of the writer, since real sources
    spend most of their time waiting on storage. ``seasonal``: the source serves seasonal samples
    (``enable_seasonal_views``), each packed with its second date in the same record, so a
    training read of it costs no extra request; the window is part of the settings.
    """
    if samples_per_chunk < 1:
        raise ValueError(f"samples_per_chunk must be >= 1, got {samples_per_chunk}")
    if chunks_per_shard is not None and chunks_per_shard < 1:
        raise ValueError(f"chunks_per_shard must be >= 1, got {chunks_per_shard}")
    if codec not in SHARD_CODECS:
        raise ValueError(f"codec must be one of {SHARD_CODECS}, got {codec!r}")
    if read_workers < 1:
        raise ValueError(f"read_workers must be >= 1, got {read_workers}")
    num_source = len(source)
    dropped_at_index = dict(sorted(getattr(source, "error_counts", {}).items()))
    if num_source == 0:
        raise RsdinoError("the source has no samples; nothing to pack")
    order = np.random.default_rng(seed).permutation(num_source).tolist()
    if chunks_per_shard is None:
        sample_bytes = len(_first_good_record(source, order, codec)[0])
        chunks_per_shard = max(1, target_shard_bytes // (samples_per_chunk * sample_bytes))
    settings = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "seed": seed,
        "codec": codec,
        "samples_per_chunk": samples_per_chunk,
        "chunks_per_shard": chunks_per_shard,
        "source_samples": num_source,
    }
    if seasonal is not None:
        settings["seasonal"] = {
            "min_days_apart": seasonal.min_days_apart,
            "max_days_apart": seasonal.max_days_apart,
            "seed": seasonal.seed,
        }
    indexes: list[dict[str, Any]] = []
    written = 0
    position = 0
    while position < num_source:
        shard_id = len(indexes)
        index = _verified_index(dst, shard_id, settings, position)
        if index is None:
            index = _write_shard(source, dst, shard_id, order, position, settings, read_workers)
            written += 1
        indexes.append(index)
        position = index["positions"][1]
    manifest = _manifest(settings, description, indexes)
    if manifest["total_samples"] == 0:
        raise RsdinoError(
            f"the source skipped all {num_source} samples as bad; see the logged data errors"
        )
    dst.write(MANIFEST_KEY, to_json_bytes(manifest))
    return PackReport(
        uri=dst.uri,
        shards_written=written,
        shards_skipped=len(indexes) - written,
        total_samples=manifest["total_samples"],
        skipped_samples=manifest["skipped_samples"],
        skipped_by_kind=manifest["skipped_by_kind"],
        total_bytes=sum(index["nbytes"] for index in indexes),
        dropped_at_index=dropped_at_index,
    )


def _first_good_record(source: Dataset, order: list[int], codec: str) -> Record:
    for index in order:
        with contextlib.suppress(SkipSample):
            return encode_sample(source[index], codec)
    raise RsdinoError(f"the source skipped all {len(order)} samples as bad; nothing to pack")


def _verified_index(
    dst: Store, shard_id: int, settings: dict[str, Any], start: int
) -> dict[str, Any] | None:
    """The index of an intact shard made with these settings from ``start`` on, else None."""
    index_key, data_key = shard_index_key(shard_id), shard_data_key(shard_id)
    if not (dst.exists(index_key) and dst.exists(data_key)):
        return None
    try:
        index = read_json(dst, index_key)
    except RsdinoError:
        return None  # a damaged index is rewritten like a missing one
    if index.get("settings") != settings or index.get("positions", [None])[0] != start:
        return None
    return index if sha256_hex(dst.read(data_key)) == index.get("sha256") else None


def _encoded_or_skipped(source: Dataset, index: int, codec: str) -> Record | SkipSample:
    try:
        return encode_sample(source[index], codec)
    except SkipSample as skip:
        return skip


def _read_ahead(
    source: Dataset, indices: list[int], codec: str, workers: int
) -> Iterator[Record | SkipSample]:
    """Encoded samples (or their SkipSample) in the order of ``indices``, read by a thread pool."""
    return ordered_map(
        lambda index: _encoded_or_skipped(source, index, codec), indices, workers, "rsdino-pack"
    )


def _write_shard(
    source: Dataset,
    dst: Store,
    shard_id: int,
    order: list[int],
    start: int,
    settings: dict[str, Any],
    workers: int,
) -> dict[str, Any]:
    """Fill a shard from permutation position ``start``; write .bin, verify it, then the index.

    The read-ahead may read a few samples past the shard's end; the next shard reads them again.
    """
    samples_per_chunk = settings["samples_per_chunk"]
    capacity = samples_per_chunk * settings["chunks_per_shard"]
    records: list[Record] = []
    skipped: list[dict[str, str]] = []
    end = start
    with contextlib.closing(_read_ahead(source, order[start:], settings["codec"], workers)) as read:
        for result in read:
            end += 1
            if isinstance(result, SkipSample):
                skipped.append({"key": result.key, "kind": result.kind})
                continue
            records.append(result)
            if len(records) == capacity:
                break
    chunks = [
        assemble_chunk(records[first : first + samples_per_chunk])
        for first in range(0, len(records), samples_per_chunk)
    ]
    data, chunk_metas = assemble_shard(chunks)
    index = {
        "shard": shard_name(shard_id),
        "settings": settings,
        "positions": [start, end],
        "samples": len(records),
        "skipped": skipped,
        "nbytes": len(data),
        "sha256": sha256_hex(data),
        "chunks": chunk_metas,
    }
    write_verified(dst, shard_data_key(shard_id), data)
    dst.write(shard_index_key(shard_id), to_json_bytes(index))
    return index


def _array_specs(indexes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The arrays every sample has (name -> dtype, shape); batches need them all alike."""
    specs: dict[str, dict[str, Any]] | None = None
    for index in indexes:
        for chunk in index["chunks"]:
            for sample in chunk["samples"]:
                found = {
                    array["name"]: {"dtype": array["dtype"], "shape": array["shape"]}
                    for array in sample["arrays"]
                }
                if specs is None:
                    specs = found
                elif found != specs:
                    raise RsdinoError(
                        f"sample {sample['key']!r} has arrays {found}, earlier samples {specs}: "
                        "every sample of a packed dataset needs the same fields and shapes"
                    )
    return specs or {}


def _band_layout(specs: dict[str, dict[str, Any]]) -> dict[str, list[str] | None]:
    """Band names per modality, inferred from the channel count (None where it is ambiguous)."""
    layout: dict[str, list[str] | None] = {}
    if "s2" in specs:
        channels = specs["s2"]["shape"][0]
        matches = [list(bands) for bands in S2_LAYOUTS.values() if len(bands) == channels]
        layout["s2"] = matches[0] if len(matches) == 1 else None
    if "s1" in specs:
        layout["s1"] = list(S1_BANDS) if specs["s1"]["shape"][0] == len(S1_BANDS) else None
    return layout


def _manifest(
    settings: dict[str, Any], description: dict[str, Any], indexes: list[dict[str, Any]]
) -> dict[str, Any]:
    specs = _array_specs(indexes)
    skipped_by_kind = Counter(entry["kind"] for index in indexes for entry in index["skipped"])
    return {
        **settings,
        "source": description,
        "modalities": [name for name in MODALITIES if name in specs],
        "arrays": specs,
        "band_layout": _band_layout(specs),
        "total_samples": sum(index["samples"] for index in indexes),
        "skipped_samples": sum(skipped_by_kind.values()),
        "skipped_by_kind": dict(sorted(skipped_by_kind.items())),
        "shards": [
            {
                "name": index["shard"],
                "data": shard_data_key(shard_id),
                "index": shard_index_key(shard_id),
                "samples": index["samples"],
                "chunks": len(index["chunks"]),
                "nbytes": index["nbytes"],
                "sha256": index["sha256"],
            }
            for shard_id, index in enumerate(indexes)
        ],
    }


def describe_report(report: PackReport) -> str:
    """One line for the CLI to print."""
    kinds = ", ".join(f"{kind}: {count}" for kind, count in report.skipped_by_kind.items())
    dropped = ", ".join(f"{kind}: {count}" for kind, count in report.dropped_at_index.items())
    return (
        f"packed {report.total_samples} samples into {report.uri} "
        f"({report.shards_written} shards written, {report.shards_skipped} already complete, "
        f"{report.total_bytes / 2**20:.1f} MiB); "
        f"{report.skipped_samples} bad samples left out"
        + (f" ({kinds})" if kinds else "")
        + (
            f"; {sum(report.dropped_at_index.values())} dropped while indexing the source "
            f"({dropped})"
            if dropped
            else ""
        )
    )
