"""The student encoder's config (``student.*``; the teacher has the same shapes), torch-free.

``models/build.py`` builds the ViT(s) and fusion from it. Checks that depend on the mode
(which arch keys are built, the fused width) or on the data (band counts) are in
``config/validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rsdino.config.component import Checks
from rsdino.models.specs import FFN_LAYER_NAMES, FUSE_ALGS, PATCH_EMBED_ADAPT_MODES


@dataclass
class CrossAttentionConfig:
    """Cross-attention fusion layers of a multimodal encoder (``fuse_alg: xattn``)."""

    nhead: int = 4
    """Attention heads per fusion layer; must divide the fused width."""
    nlayer: int = 6
    """Fusion layers."""
    dropout: float = 0.0
    """Dropout inside the fusion layers."""

    def __post_init__(self) -> None:
        checks = Checks("student.xattn")
        checks.require(self.nhead >= 1, "nhead", "must be >= 1", self.nhead)
        checks.require(self.nlayer >= 0, "nlayer", "must be >= 0", self.nlayer)
        checks.require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)", self.dropout)
        checks.raise_any()


@dataclass
class StudentConfig:
    """The ViT backbone(s): one for unimodal runs, one per modality fused for multimodal ones."""

    arch: str = "vit_large"
    """vit_tiny, vit_small, vit_base, vit_large or vit_giant2 (unimodal)."""
    arch_s1: str = "vit_base"
    """Multimodal: the Sentinel-1 encoder."""
    arch_s2: str = "vit_base"
    """Multimodal: the Sentinel-2 encoder."""
    patch_size: int = 16
    """Patch side in pixels."""
    embed_dim: int | None = None
    """null: the arch's width; set to shrink every encoder (tests, CPU)."""
    depth: int | None = None
    """null: the arch's depth (applies to every encoder)."""
    num_heads: int | None = None
    """null: the arch's head count (applies to every encoder)."""
    in_chans: int = 13
    """Unimodal input bands; must match train.dataset.s2_layout."""
    in_chans_s1: int = 2
    """Multimodal: Sentinel-1 bands (VV, VH)."""
    in_chans_s2: int = 13
    """Multimodal: Sentinel-2 bands; must match train.dataset.s2_layout."""
    fuse_alg: str = "linear"
    """Multimodal fusion: linear (concatenate, project) or xattn."""
    xattn: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    """Cross-attention fusion layers (fuse_alg: xattn)."""
    temporal_embedding: bool = False
    """Add a sinusoidal day-of-year embedding to every token."""
    temporal_year: bool = False
    """Also embed the acquisition year (needs a source that has years; none does yet)."""
    drop_path_rate: float = 0.3
    """Stochastic depth rate (of the last block, or of every block with drop_path_uniform)."""
    layerscale: float | None = 1.0e-05
    """LayerScale init value; 0 or null disables LayerScale (as DINOv2)."""
    drop_path_uniform: bool = True
    """The same drop rate in every block, as DINOv2's configs set."""
    pretrained_weights: str = ""
    """DINOv2-format backbone checkpoint loaded into every encoder."""
    pretrained_patch_embed_adapt: str = "mean"
    """How a 3-band checkpoint fills in_chans bands: mean or rgb."""
    pretrained_rgb_band_indices: list[int] = field(default_factory=lambda: [3, 2, 1])
    """Band indices of R, G, B for adapt=rgb (B4, B3, B2)."""
    ffn_layer: str = "mlp"
    """mlp, swiglu or swiglufused."""
    block_chunks: int = 0
    """>1 groups blocks into chunks (DINOv2 checkpoint key layout)."""
    qkv_bias: bool = True
    """Bias of the attention's query/key/value projection."""
    proj_bias: bool = True
    """Bias of the attention's output projection."""
    ffn_bias: bool = True
    """Biases of the feed-forward layers."""
    num_register_tokens: int = 0
    """Register tokens (DINOv2 with registers); 0: none."""
    interpolate_antialias: bool = False
    """Antialias when resampling the position embedding to another grid."""
    interpolate_offset: float = 0.1
    """DINOv2's offset when resampling the position embedding."""

    def __post_init__(self) -> None:
        checks = Checks("student")
        checks.require(self.patch_size >= 1, "patch_size", "must be >= 1", self.patch_size)
        for key in ("in_chans", "in_chans_s1", "in_chans_s2"):
            checks.require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        for key in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, key)
            checks.require(value is None or value >= 1, key, "must be null or >= 1", value)
        checks.require(
            self.num_register_tokens >= 0,
            "num_register_tokens",
            "must be >= 0",
            self.num_register_tokens,
        )
        checks.require(
            0.0 <= self.drop_path_rate < 1.0,
            "drop_path_rate",
            "must be in [0, 1)",
            self.drop_path_rate,
        )
        checks.require(self.block_chunks >= 0, "block_chunks", "must be >= 0", self.block_chunks)
        checks.choice("ffn_layer", self.ffn_layer, FFN_LAYER_NAMES)
        checks.choice("fuse_alg", self.fuse_alg, FUSE_ALGS)
        checks.choice(
            "pretrained_patch_embed_adapt",
            self.pretrained_patch_embed_adapt,
            PATCH_EMBED_ADAPT_MODES,
        )
        checks.require(
            not self.temporal_year,
            "temporal_year",
            "is not supported yet: no source passes acquisition years to the model; set it to "
            "false",
        )
        checks.raise_any()
