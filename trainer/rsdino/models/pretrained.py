"""Load DINOv2 (or rsdino) weights: backbones into a ``VisionTransformer`` with any band count,
and the DINO / iBOT heads of DINOv2 training checkpoints into a ``DINOHead``.

Official DINOv2 checkpoints are RGB; the patch embedding is adapted to multispectral inputs and
the position grid is resampled, everything else must match exactly (strict loading).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rsdino.models.heads import DINOHead
from rsdino.models.specs import PATCH_EMBED_ADAPT_MODES
from rsdino.models.vit import VisionTransformer, resample_patch_pos_embed

# Checkpoint wrappers, most specific first: the EMA teacher is the backbone DINOv2 evaluates.
_WRAPPER_KEYS = ("teacher", "model")
HEAD_NAMES = ("dino_head", "ibot_head")
_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
_FLAT_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_PATCH_WEIGHT = "patch_embed.proj.weight"
_SHOWN_KEYS = 5


def _teacher_part(checkpoint: Mapping[str, Any], part: str) -> dict[str, Any]:
    """Unwrap ``{"teacher": ...}`` / ``{"model": ...}`` and keep one part's keys, unprefixed.

    A full training checkpoint holds student and teacher, backbone and heads; only the teacher's
    ``part`` (``teacher.<part>.*``, or ``<part>.*`` in a teacher-only file) is kept.
    """
    state: Mapping[str, Any] = checkpoint
    while wrapper := next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None):
        state = state[wrapper]
    for prefix in ("module.", f"teacher.{part}.", f"{part}."):
        if any(key.startswith(prefix) for key in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def extract_backbone_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher backbone's weights of a DINOv2 or rsdino checkpoint, without prefixes."""
    return _teacher_part(checkpoint, "backbone")


def _flat_block_keys(state: dict[str, Any]) -> dict[str, Any]:
    """``blocks.c.i.*`` -> ``blocks.i.*``: the inner index of a chunk is already the global one."""
    return {_CHUNKED_BLOCK_KEY.sub(r"blocks.\1.\2", key): value for key, value in state.items()}


def _chunked_block_keys(state: dict[str, Any], chunk_size: int) -> dict[str, Any]:
    """``blocks.i.*`` -> ``blocks.{i // chunk_size}.i.*``, the layout of a chunked model."""

    def rename(key: str) -> str:
        match = _FLAT_BLOCK_KEY.match(key)
        if match is None:
            return key
        index = int(match[1])
        return f"blocks.{index // chunk_size}.{index}.{match[2]}"

    return {rename(key): value for key, value in state.items()}


def _check_adapt_mode(mode: str, rgb_band_indices: tuple[int, int, int] | None) -> None:
    if mode not in PATCH_EMBED_ADAPT_MODES:
        raise ValueError(
            f"Unknown patch_embed_adapt {mode!r}; expected one of {list(PATCH_EMBED_ADAPT_MODES)}"
        )
    if mode == "rgb" and rgb_band_indices is None:
        raise ValueError("patch_embed_adapt='rgb' needs rgb_band_indices (model bands for R, G, B)")


def adapt_patch_embed_weight(
    weight: Tensor,
    in_chans: int,
    mode: str = "mean",
    rgb_band_indices: tuple[int, int, int] | None = None,
) -> Tensor:
    """Turn a patch-embedding kernel [D, C_ckpt, p, p] into one for ``in_chans`` bands.

    ``"mean"``: every band gets the mean filter. ``"rgb"``: the checkpoint's R, G, B filters go to
    ``rgb_band_indices``, the other bands get the mean filter. Everything is scaled by
    C_ckpt / in_chans so that bands of similar magnitude produce activations of the same scale as
    the checkpoint saw. The kernel is returned unchanged when the band counts already match.
    """
    _check_adapt_mode(mode, rgb_band_indices)
    source_chans = weight.shape[1]
    if source_chans == in_chans:
        return weight
    scale = source_chans / in_chans
    filters = weight.float()
    adapted = filters.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * scale
    if mode == "rgb":
        if source_chans != 3:
            raise ValueError(
                f"patch_embed_adapt='rgb' needs a 3-band checkpoint, got {source_chans}"
            )
        bands = list(rgb_band_indices or ())
        if len(bands) != 3 or len(set(bands)) != 3 or not all(0 <= b < in_chans for b in bands):
            raise ValueError(
                f"rgb_band_indices {rgb_band_indices} must be 3 distinct bands in 0..{in_chans - 1}"
            )
        adapted[:, bands] = filters * scale
    return adapted.to(weight.dtype)


def _describe_problems(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped keys, a few of each, for one readable error."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)):
        if keys:
            more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
            problems.append(f"{label}: {keys[:_SHOWN_KEYS]}{more}")
    return problems


def _read_checkpoint(source: str | Path | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """A checkpoint given as a state dict or a file, and how to name it in errors."""
    if isinstance(source, Mapping):
        return "the given state dict", source
    return str(source), torch.load(source, map_location="cpu", weights_only=True)


def load_pretrained_head(
    head: DINOHead, source: str | Path | Mapping[str, Any], name: str = "dino_head"
) -> None:
    """Load the teacher's ``name`` head (``dino_head`` or ``ibot_head``) of a DINOv2 checkpoint.

    DINOv2's head keys (``mlp.<i>.*``, ``last_layer.weight_g``, ``last_layer.weight_v``) are
    ``DINOHead``'s own, so nothing is renamed; sizes must match exactly. Raises ValueError,
    before touching the head, if anything does not match.
    """
    if name not in HEAD_NAMES:
        raise ValueError(f"Unknown head {name!r}; expected one of {list(HEAD_NAMES)}")
    label, checkpoint = _read_checkpoint(source)
    state = _teacher_part(checkpoint, name)
    problems = _describe_problems(state, head.state_dict())
    if problems:
        raise ValueError(f"Checkpoint {label} has no {name} that fits: " + "; ".join(problems))
    head.load_state_dict(state, strict=True)


def load_pretrained_backbone(
    model: VisionTransformer,
    source: str | Path | Mapping[str, Tensor],
    patch_embed_adapt: str = "mean",
    rgb_band_indices: tuple[int, int, int] | None = None,
) -> None:
    """Load backbone weights from a file or state dict into ``model`` (before any sharding).

    Handles wrapped/prefixed checkpoints, chunked vs flat block keys, a different band count
    (see ``adapt_patch_embed_weight``) and a different position grid (bicubic resampling).
    Raises ValueError, before touching the model, if anything else does not match.
    """
    _check_adapt_mode(patch_embed_adapt, rgb_band_indices)
    name, checkpoint = _read_checkpoint(source)
    state = _flat_block_keys(extract_backbone_state_dict(checkpoint))
    if model.chunked_blocks:
        state = _chunked_block_keys(state, model.n_blocks // len(model.blocks))

    expected = model.state_dict()
    if _PATCH_WEIGHT in state:
        state[_PATCH_WEIGHT] = adapt_patch_embed_weight(
            state[_PATCH_WEIGHT], model.in_chans, patch_embed_adapt, rgb_band_indices
        )
    pos_embed = state.get("pos_embed")
    target_tokens = expected["pos_embed"].shape[1]
    if pos_embed is not None and pos_embed.shape[1] != target_tokens:
        side = math.isqrt(target_tokens - 1)
        patch_pos = resample_patch_pos_embed(
            pos_embed[:, 1:], (side, side), antialias=model.interpolate_antialias
        )
        state["pos_embed"] = torch.cat((pos_embed[:, :1], patch_pos), dim=1)

    problems = _describe_problems(state, expected)
    if problems:
        raise ValueError(f"Checkpoint {name} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
