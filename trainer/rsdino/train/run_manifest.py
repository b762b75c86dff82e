"""What of a run's config a checkpoint pins down, and how a resumed config differs from it.

A checkpoint's marker records the resolved config it was written under. Resuming with a config
that builds a different model (another width, depth, head, fusion...) cannot load the weights;
without this check the user only sees "size mismatch" for every checkpoint and concludes they are
damaged. Other changes (epochs, learning rate, ranks) are legitimate on resume and are logged.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys (or prefixes of keys) whose value shapes the parameters and buffers in a checkpoint.
MODEL_SHAPING_KEYS = (
    "train.multimodal",
    "student.arch",
    "student.arch_s1",
    "student.arch_s2",
    "student.patch_size",
    "student.embed_dim",
    "student.depth",
    "student.num_heads",
    "student.in_chans",
    "student.in_chans_s1",
    "student.in_chans_s2",
    "student.fuse_alg",
    "student.xattn.",
    "student.temporal_embedding",
    "student.temporal_year",
    "student.ffn_layer",
    "student.block_chunks",
    "student.qkv_bias",
    "student.proj_bias",
    "student.ffn_bias",
    "student.num_register_tokens",
    "dino.head_",
    "ibot.separate_head",
    "ibot.head_",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _shapes_model(key: str) -> bool:
    return any(
        key == name or (name.endswith(("_", ".")) and key.startswith(name))
        for name in MODEL_SHAPING_KEYS
    )


def config_changes(saved_yaml: str, cfg: DictConfig) -> tuple[list[str], list[str]]:
    """``(model-shaping changes, other changes)``, each as ``"key old -> new"``."""
    saved = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))
    shaping, other = [], []
    for key in sorted(saved.keys() | now.keys()):
        before, after = saved.get(key, "<unset>"), now.get(key, "<unset>")
        if before != after:
            (shaping if _shapes_model(key) else other).append(f"{key} {before} -> {after}")
    return shaping, other
