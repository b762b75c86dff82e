"""Turn ``cfg.student`` into modules: one ViT per modality, fusion, temporal embedding, heads."""

from __future__ import annotations

from omegaconf import DictConfig

from rsdino.errors import RsdinoError
from rsdino.models.encoder import RemoteSensingEncoder, build_encoder
from rsdino.models.heads import DINOHead
from rsdino.models.pretrained import load_pretrained_backbone
from rsdino.models.vit import VisionTransformer, build_vit


def modalities(cfg: DictConfig) -> tuple[str, ...]:
    """The image modalities a run reads: Sentinel-1 and -2, or Sentinel-2 alone."""
    return ("s1", "s2") if cfg.train.multimodal else ("s2",)


def _arch_and_bands(cfg: DictConfig, modality: str) -> tuple[str, int]:
    s = cfg.student
    if not cfg.train.multimodal:
        return s.arch, s.in_chans
    return (s.arch_s1, s.in_chans_s1) if modality == "s1" else (s.arch_s2, s.in_chans_s2)


def describe_encoders(cfg: DictConfig) -> str:
    """The encoders a run trains, for the start line: each modality's arch, patch and bands."""
    s = cfg.student
    shrunk = ", ".join(
        f"{name} {value}"
        for name, value in (("dim", s.embed_dim), ("depth", s.depth), ("heads", s.num_heads))
        if value is not None
    )
    parts = []
    for modality in modalities(cfg):
        arch, bands = _arch_and_bands(cfg, modality)
        parts.append(f"{arch}/{s.patch_size} ({modality.upper()}, {bands} bands)")
    text = " + ".join(parts)
    if cfg.train.multimodal:
        text += f", {s.fuse_alg} fusion"
    return f"{text}, {shrunk}" if shrunk else text


def build_backbone(
    cfg: DictConfig, *, arch: str, in_chans: int, drop_path_rate: float
) -> VisionTransformer:
    """A ViT with the shared ``cfg.student`` options; arch and band count differ per modality."""
    s = cfg.student
    return build_vit(
        arch,
        img_size=cfg.crops.global_crops_size,
        patch_size=s.patch_size,
        in_chans=in_chans,
        embed_dim=s.embed_dim,
        depth=s.depth,
        num_heads=s.num_heads,
        qkv_bias=s.qkv_bias,
        ffn_bias=s.ffn_bias,
        proj_bias=s.proj_bias,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=s.drop_path_uniform,
        init_values=s.layerscale,
        ffn_layer=s.ffn_layer,
        block_chunks=s.block_chunks,
        num_register_tokens=s.num_register_tokens,
        interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset,
    )


def _load_pretrained(backbone: VisionTransformer, modality: str, student_cfg: DictConfig) -> None:
    """DINOv2 weights into one encoder; SAR has no RGB bands, so it always takes the mean filter."""
    path = student_cfg.pretrained_weights
    adapt = student_cfg.pretrained_patch_embed_adapt if modality == "s2" else "mean"
    try:
        load_pretrained_backbone(
            backbone,
            path,
            patch_embed_adapt=adapt,
            rgb_band_indices=tuple(student_cfg.pretrained_rgb_band_indices),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise RsdinoError(
            f"cannot load student.pretrained_weights='{path}' into the {modality} encoder: {exc}. "
            "Point it at a DINOv2-format backbone checkpoint that matches the arch and patch "
            "size, or set it to ''."
        ) from exc


def build_encoder_from_config(
    cfg: DictConfig, *, drop_path_rate: float, load_pretrained: bool
) -> RemoteSensingEncoder:
    """The student's encoder (stochastic depth, pretrained weights) or the teacher's."""
    s = cfg.student
    backbones = {}
    for modality in modalities(cfg):
        arch, in_chans = _arch_and_bands(cfg, modality)
        backbone = build_backbone(cfg, arch=arch, in_chans=in_chans, drop_path_rate=drop_path_rate)
        if load_pretrained and s.pretrained_weights:
            _load_pretrained(backbone, modality, s)
        backbones[modality] = backbone
    return build_encoder(
        backbones=backbones,
        fuse_alg=s.fuse_alg if cfg.train.multimodal else None,
        xattn_nhead=s.xattn.nhead,
        xattn_nlayer=s.xattn.nlayer,
        xattn_dropout=s.xattn.dropout,
        temporal=s.temporal_embedding,
        temporal_use_year=s.temporal_year,
    )


def build_head(head_cfg: DictConfig, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=head_cfg.head_n_prototypes,
        nlayers=head_cfg.head_nlayers,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
    )
