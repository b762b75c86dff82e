"""Turn the student config into modules: one ViT per modality, fusion, temporal embedding, heads.

The builders take their own sections (``StudentConfig``, ``DinoConfig``/``IBotConfig``) and, as
plain arguments, the few facts other sections own (``train.multimodal``, the global crop size),
so each one depends only on what it reads and the whole run config stays with its callers.
"""

from __future__ import annotations

from omegaconf import DictConfig

from rsdino.data.band_tables import modalities_of
from rsdino.errors import RsdinoError
from rsdino.models.encoder import RemoteSensingEncoder, build_encoder
from rsdino.models.encoder_config import StudentConfig
from rsdino.models.heads import DINOHead
from rsdino.models.pretrained import load_pretrained_backbone
from rsdino.models.vit import VisionTransformer, build_vit
from rsdino.ssl.loss_config import DinoConfig, IBotConfig


def modalities(cfg: DictConfig) -> tuple[str, ...]:
    """The modalities of a run's root config (its ``train.multimodal``)."""
    return modalities_of(cfg.train.multimodal)


def _arch_and_bands(student: StudentConfig, modality: str, multimodal: bool) -> tuple[str, int]:
    if not multimodal:
        return student.arch, student.in_chans
    if modality == "s1":
        return student.arch_s1, student.in_chans_s1
    return student.arch_s2, student.in_chans_s2


def describe_encoders(student: StudentConfig, *, multimodal: bool) -> str:
    """The encoders a run trains, for the start line: each modality's arch, patch and bands."""
    shrunk = ", ".join(
        f"{name} {value}"
        for name, value in (
            ("dim", student.embed_dim),
            ("depth", student.depth),
            ("heads", student.num_heads),
        )
        if value is not None
    )
    parts = []
    for modality in modalities_of(multimodal):
        arch, bands = _arch_and_bands(student, modality, multimodal)
        parts.append(f"{arch}/{student.patch_size} ({modality.upper()}, {bands} bands)")
    text = " + ".join(parts)
    if multimodal:
        text += f", {student.fuse_alg} fusion"
    return f"{text}, {shrunk}" if shrunk else text


def build_backbone(
    student: StudentConfig, *, arch: str, in_chans: int, img_size: int, drop_path_rate: float
) -> VisionTransformer:
    """A ViT with the shared student options; arch and band count differ per modality.

    ``img_size`` is the global crop size: it sets the position-embedding grid.
    """
    return build_vit(
        arch,
        img_size=img_size,
        patch_size=student.patch_size,
        in_chans=in_chans,
        embed_dim=student.embed_dim,
        depth=student.depth,
        num_heads=student.num_heads,
        qkv_bias=student.qkv_bias,
        ffn_bias=student.ffn_bias,
        proj_bias=student.proj_bias,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=student.drop_path_uniform,
        init_values=student.layerscale,
        ffn_layer=student.ffn_layer,
        block_chunks=student.block_chunks,
        num_register_tokens=student.num_register_tokens,
        interpolate_antialias=student.interpolate_antialias,
        interpolate_offset=student.interpolate_offset,
    )


def _load_pretrained(backbone: VisionTransformer, modality: str, student: StudentConfig) -> None:
    """DINOv2 weights into one encoder; SAR has no RGB bands, so it always takes the mean filter."""
    path = student.pretrained_weights
    adapt = student.pretrained_patch_embed_adapt if modality == "s2" else "mean"
    try:
        load_pretrained_backbone(
            backbone,
            path,
            patch_embed_adapt=adapt,
            rgb_band_indices=tuple(student.pretrained_rgb_band_indices),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise RsdinoError(
            f"cannot load student.pretrained_weights='{path}' into the {modality} encoder: {exc}. "
            "Point it at a DINOv2-format backbone checkpoint that matches the arch and patch "
            "size, or set it to ''."
        ) from exc


def build_encoder_from_config(
    student: StudentConfig,
    *,
    multimodal: bool,
    img_size: int,
    drop_path_rate: float,
    load_pretrained: bool,
) -> RemoteSensingEncoder:
    """The student's encoder (stochastic depth, pretrained weights) or the teacher's."""
    backbones = {}
    for modality in modalities_of(multimodal):
        arch, in_chans = _arch_and_bands(student, modality, multimodal)
        backbone = build_backbone(
            student,
            arch=arch,
            in_chans=in_chans,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
        )
        if load_pretrained and student.pretrained_weights:
            _load_pretrained(backbone, modality, student)
        backbones[modality] = backbone
    return build_encoder(
        backbones=backbones,
        fuse_alg=student.fuse_alg if multimodal else None,
        xattn_nhead=student.xattn.nhead,
        xattn_nlayer=student.xattn.nlayer,
        xattn_dropout=student.xattn.dropout,
        temporal=student.temporal_embedding,
        temporal_use_year=student.temporal_year,
    )


def build_head(head: DinoConfig | IBotConfig, in_dim: int) -> DINOHead:
    """The DINO head, or iBOT's separate one: both sections spell their head keys alike."""
    return DINOHead(
        in_dim=in_dim,
        out_dim=head.head_n_prototypes,
        nlayers=head.head_nlayers,
        hidden_dim=head.head_hidden_dim,
        bottleneck_dim=head.head_bottleneck_dim,
    )
