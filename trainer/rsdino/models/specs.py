"""Facts about the encoders that config checks and the CLI need without importing torch.

The torch modules (``vit``, ``encoder``, ``pretrained``) import these, so each list has one home.
"""

from __future__ import annotations

# Architecture name -> (embed_dim, depth, num_heads), as DINOv2 names its ViTs.
ARCH_SPECS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}

# Feed-forward layers a block can use (``student.ffn_layer``); ``vit.FFN_LAYERS`` maps them to
# their classes.
FFN_LAYER_NAMES: tuple[str, ...] = ("mlp", "swiglu", "swiglufused")

# How the encoders of a multimodal model are fused (``student.fuse_alg``).
FUSE_ALGS: tuple[str, ...] = ("linear", "xattn")

# How a pretrained RGB patch embedding is spread over more bands
# (``student.pretrained_patch_embed_adapt``).
PATCH_EMBED_ADAPT_MODES: tuple[str, ...] = ("mean", "rgb")
