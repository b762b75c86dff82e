"""Last-layer [CLS] attention of the teacher, per head, rendered over the input tile as PNGs.

The ViT's attention runs through ``scaled_dot_product_attention``, which does not return its
weights. They are recomputed here from the real last block: its ``norm1`` and ``qkv``
projection applied to the tokens the earlier blocks produced, then softmax(q k^T / sqrt(d)).
The model is not changed; a test checks that these weights reproduce the block's own output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from rsdino.data.bands import band_names
from rsdino.models.encoder import RemoteSensingEncoder
from rsdino.models.vit import VisionTransformer

# Anchor colours of a dark-to-bright heat map (black, purple, red, orange, pale yellow).
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)
OVERLAY_ALPHA = 0.6


def transformer_blocks(backbone: VisionTransformer) -> list[nn.Module]:
    """The blocks in order, looking through DINOv2's chunk grouping and its Identity padding."""
    blocks = []
    for module in backbone.blocks:
        members = module if isinstance(module, nn.ModuleList) else [module]
        blocks.extend(block for block in members if not isinstance(block, nn.Identity))
    return blocks


@torch.no_grad()
def last_block_inputs(
    backbone: VisionTransformer, x: Tensor, token_bias: Tensor | None = None
) -> tuple[nn.Module, Tensor]:
    """The last block and the tokens it receives, [B, 1+R+N, D]."""
    tokens = backbone.prepare_tokens(x)
    if token_bias is not None:
        tokens = tokens + token_bias.unsqueeze(1).to(tokens.dtype)
    blocks = transformer_blocks(backbone)
    for block in blocks[:-1]:
        tokens = block(tokens)
    return blocks[-1], tokens


@torch.no_grad()
def attention_weights(block: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention [B, heads, T, T] of ``block`` on its input, and the values [B, h, T, d].

    Computed from the block's own layers, the same way its ``Attention.forward`` feeds SDPA.
    """
    attention = block.attn
    normed = block.norm1(tokens)
    batch, count, dim = normed.shape
    head_dim = dim // attention.num_heads
    qkv = attention.qkv(normed).reshape(batch, count, 3, attention.num_heads, head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    logits = (query.float() @ key.float().transpose(-2, -1)) * head_dim**-0.5
    return logits.softmax(dim=-1), value


def cls_attention_maps(
    backbone: VisionTransformer, x: Tensor, token_bias: Tensor | None = None
) -> Tensor:
    """Per-head attention of the [CLS] query on the patch tokens, [B, heads, H/p, W/p].

    Register tokens are left out, so each head's map sums to 1 minus its register share.
    """
    block, tokens = last_block_inputs(backbone, x, token_bias)
    weights, _ = attention_weights(block, tokens)
    first_patch = 1 + backbone.num_register_tokens
    grid = (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size)
    return weights[:, :, 0, first_patch:].reshape(x.shape[0], -1, *grid)


def stretch(band: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """A band scaled to [0, 1] between its ``low`` and ``high`` percentiles, clipped."""
    lo, hi = np.percentile(band.astype(np.float64), (low, high))
    if hi <= lo:
        return np.zeros(band.shape, dtype=np.float32)
    return np.clip((band - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def rgb_of_s2(s2: np.ndarray, layout: str) -> np.ndarray:
    """True colour [H, W, 3] in [0, 1] from B4, B3, B2, each with a 2-98 percentile stretch."""
    names = band_names("s2", layout)
    return np.stack([stretch(s2[names.index(band)]) for band in ("B4", "B3", "B2")], axis=-1)


def grey_of_vv(s1: np.ndarray) -> np.ndarray:
    """The VV band (dB) as grey [H, W, 3] in [0, 1] with a 2-98 percentile stretch."""
    return np.repeat(stretch(s1[0])[..., None], 3, axis=-1)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] [H, W] to colours [H, W, 3] in [0, 1] along the heat-map anchors."""
    position = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    lower = np.minimum(np.floor(position).astype(int), len(_HEAT_ANCHORS) - 2)
    fraction = (position - lower)[..., None]
    colours = (1 - fraction) * _HEAT_ANCHORS[lower] + fraction * _HEAT_ANCHORS[lower + 1]
    return colours / 255.0


def overlay(base: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """An attention map [h, w] upsampled onto ``base`` [H, W, 3], min-max scaled, blended."""
    size = base.shape[:2]
    upsampled = F.interpolate(
        torch.from_numpy(attention.astype(np.float32))[None, None],
        size=size,
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    span = upsampled.max() - upsampled.min()
    scaled = (upsampled - upsampled.min()) / span if span > 0 else np.zeros_like(upsampled)
    return (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * heat_colours(scaled)


def save_png(image: np.ndarray, path: Path, scale: int) -> None:
    """[H, W, 3] in [0, 1] as an 8-bit PNG enlarged ``scale`` times (nearest neighbour)."""
    pixels = Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="RGB")
    if scale > 1:
        pixels = pixels.resize((pixels.width * scale, pixels.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels.save(path)


def write_attention(
    encoder: RemoteSensingEncoder,
    inputs: dict[str, Tensor],
    raw: dict[str, np.ndarray],
    layout: str,
    out: Path,
    *,
    doy: int | None = None,
    scale: int = 4,
) -> dict[str, list[str]]:
    """PNGs per modality in ``inputs``: the rendered input, each head's overlay, the head mean.

    ``inputs`` are normalised [1, C, H, W] tensors, ``raw`` the same tiles unnormalised
    [C, H, W] for rendering. Also writes ``attention.npz`` with the maps. Returns the files.
    """
    written: dict[str, list[str]] = {}
    arrays = {}
    for name, x in inputs.items():
        backbone = encoder.backbones[name]
        bias = None
        if encoder.temporal is not None and doy:
            bias = encoder.temporal[name](torch.tensor([doy]), None, dtype=x.dtype)
        maps = cls_attention_maps(backbone, x, bias)[0].numpy()  # [heads, h, w]
        arrays[name] = maps
        base = rgb_of_s2(raw[name], layout) if name == "s2" else grey_of_vv(raw[name])
        files = [out / f"{name}_input.png"]
        save_png(base, files[0], scale)
        for head, head_map in enumerate(maps):
            files.append(out / f"{name}_head{head}.png")
            save_png(overlay(base, head_map), files[-1], scale)
        files.append(out / f"{name}_mean.png")
        save_png(overlay(base, maps.mean(axis=0)), files[-1], scale)
        written[name] = [str(path) for path in files]
    np.savez(out / "attention.npz", **arrays)
    return written
