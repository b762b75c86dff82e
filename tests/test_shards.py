"""The shard format: records, chunks and shards round-trip exactly and are laid out as said."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from rsdino.data.collate import collate_samples
from rsdino.data.shards import (
    assemble_chunk,
    assemble_shard,
    decode_chunk,
    encode_sample,
    read_manifest,
)
from rsdino.data.storage import LocalStore
from rsdino.errors import RsdinoError


def multimodal_sample() -> dict:
    return {
        "s1": np.array([[[-12.5, -3.25]], [[-20.0, 0.5]]], dtype=np.float32),  # [2, 1, 2]
        "s2": np.arange(3 * 1 * 2, dtype=np.uint16).reshape(3, 1, 2) * 1000 + 7,
        "landcover": np.array([[4, 250]], dtype=np.uint8),
        "doy": 183,
        "key": "roi/tile/a",
        "label": 4,
    }


def optical_sample() -> dict:
    return {
        "s2": np.array([[[65535, 0]], [[1, 2]], [[3, 4]]], dtype=np.uint16),
        "doy": 1,
        "key": "satlas/b",
        "label": -1,
    }


def assert_same_sample(decoded: dict, original: dict) -> None:
    assert set(decoded) == set(original)
    for name, value in original.items():
        if isinstance(value, np.ndarray):
            assert decoded[name].dtype == value.dtype
            assert decoded[name].shape == value.shape
            np.testing.assert_array_equal(decoded[name], value)
        else:
            assert decoded[name] == value and type(decoded[name]) is type(value)


def test_raw_record_is_the_arrays_bytes_in_name_order() -> None:
    sample = multimodal_sample()
    data, meta = encode_sample(sample, "none")
    # landcover: 2 bytes, s1: 4 floats = 16 bytes, s2: 6 uint16 = 12 bytes.
    expected = sample["landcover"].tobytes() + sample["s1"].tobytes() + sample["s2"].tobytes()
    assert data == expected and len(data) == 30
    assert [(a["name"], a["offset"], a["nbytes"]) for a in meta["arrays"]] == [
        ("landcover", 0, 2),
        ("s1", 2, 16),
        ("s2", 18, 12),
    ]
    assert meta["arrays"][2]["shape"] == [3, 1, 2]
    assert (meta["key"], meta["doy"], meta["label"]) == ("roi/tile/a", 183, 4)


def test_zlib_record_compresses_each_array_on_its_own() -> None:
    sample = multimodal_sample()
    data, meta = encode_sample(sample, "zlib")
    for array in meta["arrays"]:
        assert array["codec"] == "zlib"
        payload = data[array["offset"] : array["offset"] + array["nbytes"]]
        assert zlib.decompress(payload) == sample[array["name"]].tobytes()


@pytest.mark.parametrize("codec", ["none", "zlib"])
def test_chunk_round_trip_for_both_sample_kinds(codec: str) -> None:
    samples = [multimodal_sample(), optical_sample(), multimodal_sample()]
    samples[2]["key"], samples[2]["s1"] = "roi/tile/c", samples[2]["s1"] * 2
    data, chunk_meta = assemble_chunk([encode_sample(sample, codec) for sample in samples])
    first_record_bytes = len(encode_sample(samples[0], codec)[0])
    # The second record's arrays are shifted by the first record's length.
    assert chunk_meta["samples"][1]["arrays"][0]["offset"] == first_record_bytes
    decoded = decode_chunk(data, chunk_meta)
    assert len(decoded) == 3
    for got, original in zip(decoded, samples, strict=True):
        assert_same_sample(got, original)
    # Decoded arrays are read-only views of the chunk (no copy); batching copies them once.
    assert not decoded[0]["s2"].flags.writeable
    assert collate_samples(decoded[:1])["s2"].is_contiguous()


def test_decode_can_leave_out_arrays() -> None:
    data, chunk_meta = assemble_chunk([encode_sample(multimodal_sample(), "zlib")])
    (decoded,) = decode_chunk(data, chunk_meta, arrays={"s2", "landcover"})
    assert set(decoded) == {"s2", "landcover", "key", "doy", "label"}


def test_torch_tensors_pack_like_numpy_arrays() -> None:
    sample = multimodal_sample()
    as_tensors = {**sample, "s1": torch.from_numpy(sample["s1"])}
    assert encode_sample(as_tensors)[0] == encode_sample(sample)[0]


def test_shard_offsets_follow_the_chunks() -> None:
    first = assemble_chunk([encode_sample(multimodal_sample())])
    second = assemble_chunk([encode_sample(optical_sample())])
    data, metas = assemble_shard([first, second])
    assert [meta["offset"] for meta in metas] == [0, 30]
    assert len(data) == 30 + 12
    tail = data[metas[1]["offset"] : metas[1]["offset"] + metas[1]["nbytes"]]
    assert_same_sample(decode_chunk(tail, metas[1])[0], optical_sample())


def test_bad_samples_and_codecs_are_refused() -> None:
    with pytest.raises(ValueError, match="codec"):
        encode_sample(multimodal_sample(), "lz4")
    with pytest.raises(ValueError, match="only arrays"):
        encode_sample({**optical_sample(), "cloud": 0.3})
    with pytest.raises(ValueError, match="lacks"):
        encode_sample({"s2": np.zeros(2, np.uint16), "key": "x"})


def test_missing_manifest_says_how_to_pack(tmp_path: Path) -> None:
    with pytest.raises(RsdinoError, match=r"manifest\.json is missing.*rsdino data pack SRC DST"):
        read_manifest(LocalStore(tmp_path))
