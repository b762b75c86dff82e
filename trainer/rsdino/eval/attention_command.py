"""``rsdino attention MODEL TILE --out DIR``: the teacher's last-layer [CLS] attention as PNGs."""

from __future__ import annotations

import argparse
import posixpath
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rsdino.data.bands import BandNormalizer, band_names
from rsdino.data.sources.decode import (
    BadDataPolicy,
    check_same_size,
    day_of_year_in_name,
    decode_geotiff,
    prepare_sar,
    to_reflectance_uint16,
)
from rsdino.data.storage import open_store
from rsdino.eval.attention import write_attention
from rsdino.eval.datasets import EUROSAT_BANDS, EvalDataError, reorder_bands
from rsdino.eval.features import input_size
from rsdino.eval.model import EvalModel, load_eval_model


def _read(uri: str) -> tuple[np.ndarray, str]:
    parent, _, name = uri.rpartition("/")
    store = open_store(parent or ".")
    if not store.exists(name):
        raise EvalDataError(f"tile {uri} does not exist")
    return decode_geotiff(store.read(name), uri), name


def _prepared(x: np.ndarray, normalizer: BandNormalizer, patch: int) -> torch.Tensor:
    tensor = normalizer(torch.from_numpy(np.ascontiguousarray(x))[None])
    size = input_size(tensor.shape[-1], patch)
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)
    return tensor


def attention_for_tile(
    model: EvalModel,
    tile: str,
    out: Path,
    *,
    s1_tile: str | None = None,
    tile_bands: str = "layout",
    scale: int = 4,
    stats: str | None = None,
) -> dict[str, list[str]]:
    """Read the tile(s), run the teacher's backbones, write the PNGs; returns them by modality."""
    if s1_tile and "s1" not in model.encoder.modalities:
        raise EvalDataError(f"--s1 given but the model reads only {model.encoder.modalities}")
    if "s2" not in model.encoder.modalities:
        raise EvalDataError("the model has no Sentinel-2 encoder to show attention of")
    raster, name = _read(tile)
    file_bands = EUROSAT_BANDS if tile_bands == "eurosat" else band_names("s2", model.layout)
    s2 = to_reflectance_uint16(reorder_bands(raster, file_bands, model.layout, tile))
    normalizers = model.normalizers(stats)
    patch = model.encoder.patch_size
    raw = {"s2": s2}
    inputs = {"s2": _prepared(s2, normalizers["s2"], patch)}
    if s1_tile:
        sar_raster, _ = _read(s1_tile)
        sar = prepare_sar(sar_raster, s1_tile, BadDataPolicy("fail"))
        check_same_size(s2, sar, s1_tile, "Sentinel-2 vs Sentinel-1 tile")
        raw["s1"] = sar
        inputs["s1"] = _prepared(sar, normalizers["s1"], patch)
    doy = day_of_year_in_name(posixpath.basename(name)) or None
    return write_attention(model.encoder, inputs, raw, model.layout, out, doy=doy, scale=scale)


def run_attention(args: argparse.Namespace) -> int:
    model = load_eval_model(args.model, args.step)
    written = attention_for_tile(
        model,
        args.tile,
        args.out,
        s1_tile=args.s1,
        tile_bands=args.tile_bands,
        scale=args.scale,
        stats=args.stats,
    )
    for modality, files in written.items():
        names = ", ".join(Path(file).name for file in files)
        print(f"{modality}: {len(files)} PNGs in {args.out} ({names})")
    return 0
