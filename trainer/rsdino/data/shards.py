"""The packed-shard format: samples stored as contiguous chunks inside a few large files.

Reading one object per tile from S3 starves the GPUs (a round trip per tile, a request fee per
tile), so ``rsdino data pack`` writes samples into shards and training reads whole chunks with one
range request each. A packed dataset under a store root holds::

    shards/shard-000000.bin    chunks of sample records, back to back
    shards/shard-000000.json   the shard's index: every chunk's byte range and sample layout
    ...
    manifest.json              written last: the dataset, its shards, their sizes and sha256

A chunk is ``samples_per_chunk`` consecutive sample records. A record is the bytes of its arrays
(C order), each raw or zlib-compressed. The chunk metadata in the index says where each array lies
inside the chunk, so one range read of a chunk is enough to decode all its samples.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from rsdino.data.choices import SHARD_CODECS
from rsdino.data.storage import Store
from rsdino.errors import RsdinoError

FORMAT_NAME = "rsdino-shards"
FORMAT_VERSION = 1
MANIFEST_KEY = "manifest.json"
# Fields every sample carries besides its arrays; they live in the index, not in the shard bytes.
SCALAR_FIELDS = ("key", "doy", "label")
# Level 6 is zlib's own default: a fixed level keeps repeated packs byte-identical.
_ZLIB_LEVEL = 6


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}"


def shard_data_key(shard_id: int) -> str:
    return f"shards/{shard_name(shard_id)}.bin"


def shard_index_key(shard_id: int) -> str:
    return f"shards/{shard_name(shard_id)}.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def location(store: Store, key: str) -> str:
    """Where ``key`` lives, for messages: ``s3://bucket/prefix/key`` or ``file:///dir/key``."""
    return f"{store.uri.rstrip('/')}/{key}"


def to_json_bytes(document: dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, fixed layout), so equal content gives equal bytes."""
    return (json.dumps(document, sort_keys=True, indent=1) + "\n").encode()


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def encode_sample(sample: dict[str, Any], codec: str = "none") -> tuple[bytes, dict[str, Any]]:
    """The record bytes of one sample and its metadata; array offsets are relative to the record.

    Every array field (numpy or torch) is stored; "key", "doy" and "label" go into the metadata,
    other int or str fields (a seasonal sample's "doy_b", "key_b", "days_apart") under "fields".
    """
    if codec not in SHARD_CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {SHARD_CODECS}")
    missing = [name for name in SCALAR_FIELDS if name not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('key', '?')!r} lacks the fields {missing}")
    arrays = []
    parts = []
    fields: dict[str, int | str] = {}
    offset = 0
    for name in sorted(set(sample) - set(SCALAR_FIELDS)):
        value = sample[name]
        if isinstance(value, (bool, int, np.integer, str)):
            fields[name] = value if isinstance(value, str) else int(value)
            continue
        if not isinstance(value, (np.ndarray, torch.Tensor)):
            raise ValueError(
                f"sample field {name!r} is a {type(value).__name__}; only arrays, ints and "
                "strings can be packed"
            )
        array = _as_array(value)
        payload = array.tobytes()
        if codec == "zlib":
            payload = zlib.compress(payload, _ZLIB_LEVEL)
        arrays.append(
            {
                "name": name,
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "codec": codec,
                "offset": offset,
                "nbytes": len(payload),
            }
        )
        parts.append(payload)
        offset += len(payload)
    meta = {
        "key": str(sample["key"]),
        "doy": int(sample["doy"]),
        "label": int(sample["label"]),
        "arrays": arrays,
    }
    if fields:
        meta["fields"] = fields
    return b"".join(parts), meta


def assemble_chunk(records: list[tuple[bytes, dict[str, Any]]]) -> tuple[bytes, dict[str, Any]]:
    """Concatenate encoded records into one chunk; array offsets become relative to the chunk."""
    samples = []
    start = 0
    for data, meta in records:
        arrays = [{**array, "offset": array["offset"] + start} for array in meta["arrays"]]
        samples.append({**meta, "arrays": arrays})
        start += len(data)
    data = b"".join(data for data, _ in records)
    return data, {"nbytes": len(data), "crc32": zlib.crc32(data), "samples": samples}


def assemble_shard(chunks: list[tuple[bytes, dict[str, Any]]]) -> tuple[bytes, list[dict]]:
    """Concatenate chunks into a shard's bytes; each chunk's metadata gains its offset."""
    metas = []
    offset = 0
    for data, meta in chunks:
        metas.append({**meta, "offset": offset})
        offset += len(data)
    return b"".join(data for data, _ in chunks), metas


def _decode_array(data: bytes, meta: dict[str, Any]) -> np.ndarray:
    """A read-only array viewing ``data`` (or its decompressed payload): no copy on the hot path.

    Batching copies every sample once into the batch anyway (``collate_samples``), so copying
    here as well would only double the host-side memory traffic.
    """
    payload = memoryview(data)[meta["offset"] : meta["offset"] + meta["nbytes"]]
    if meta["codec"] == "zlib":
        payload = zlib.decompress(payload)
    elif meta["codec"] != "none":
        raise RsdinoError(f"unknown codec {meta['codec']!r} in a shard index; repack the dataset")
    return np.frombuffer(payload, dtype=np.dtype(meta["dtype"])).reshape(meta["shape"])


def decode_chunk(
    data: bytes,
    chunk_meta: dict[str, Any],
    arrays: Collection[str] | None = None,
    fields: bool = True,
) -> list[dict[str, Any]]:
    """The samples of one chunk, from the chunk's bytes alone; ``arrays`` limits what is decoded,
    ``fields`` whether the extra scalar fields (see :func:`encode_sample`) come along."""
    if len(data) != chunk_meta["nbytes"]:
        raise RsdinoError(f"a chunk has {len(data)} bytes, its index says {chunk_meta['nbytes']}")
    samples = []
    for meta in chunk_meta["samples"]:
        sample: dict[str, Any] = {name: meta[name] for name in SCALAR_FIELDS}
        if fields:
            sample.update(meta.get("fields", {}))
        for array in meta["arrays"]:
            if arrays is None or array["name"] in arrays:
                sample[array["name"]] = _decode_array(data, array)
        samples.append(sample)
    return samples


def write_verified(store: Store, key: str, data: bytes) -> None:
    """Write ``data`` and read it back: a shard counts as written only once its bytes check out."""
    store.write(key, data)
    stored = store.read(key)
    if sha256_hex(stored) != sha256_hex(data):
        raise RsdinoError(
            f"{location(store, key)} reads back different bytes than were written; check the "
            "storage and run the pack again"
        )


def _parse_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RsdinoError(
            f"{where} is not valid JSON ({exc}); run `rsdino data pack SRC DST` again to repair "
            "the dataset"
        ) from exc


def read_json(store: Store, key: str) -> dict[str, Any]:
    return _parse_json(store.read(key), location(store, key))


def read_manifest(store: Store) -> dict[str, Any]:
    """The manifest of a packed dataset; a clear error when the dataset is missing or unfinished."""
    if not store.exists(MANIFEST_KEY):
        raise RsdinoError(
            f"no packed dataset at {store.uri}: {MANIFEST_KEY} is missing (the dataset was never "
            "packed, or packing did not finish); run `rsdino data pack SRC DST` with this "
            "location as DST"
        )
    manifest = read_json(store, MANIFEST_KEY)
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise RsdinoError(
            f"{location(store, MANIFEST_KEY)} is not a version {FORMAT_VERSION} {FORMAT_NAME} "
            "manifest; repack the dataset with `rsdino data pack SRC DST`"
        )
    return manifest


def read_shard_indexes(store: Store, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The index of every shard the manifest lists, read in parallel, in manifest order."""
    keys = [shard["index"] for shard in manifest["shards"]]
    return [_parse_json(data, location(store, key)) for key, data in store.read_many(keys)]
