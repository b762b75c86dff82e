"""The encoder DINOv2 trains: one ViT per modality, an optional date embedding, and fusion.

Images of one modality ({"s2": ...}) or two co-registered ones ({"s1": ..., "s2": ...}) go in;
a DINOv2-style token dict (class, register and patch tokens) comes out, shaped the same whether
one backbone ran or two were fused, so the SSL heads and losses do not care which.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rsdino.models.fusion import CrossAttentionFusion, LinearFusion
from rsdino.models.layers import weight_decay_exempt
from rsdino.models.specs import FUSE_ALGS
from rsdino.models.temporal import TemporalEmbedding
from rsdino.models.vit import VisionTransformer


def _shared_value(backbones: dict[str, VisionTransformer], attribute: str) -> int:
    """The value of ``attribute`` common to all backbones; their token grids must line up."""
    values = {name: getattr(backbone, attribute) for name, backbone in sorted(backbones.items())}
    if len(set(values.values())) != 1:
        raise ValueError(f"all backbones must share {attribute}, got {values}")
    return next(iter(values.values()))


class RemoteSensingEncoder(nn.Module):
    """One ViT per modality; with several, their full token sequences are fused token by token.

    ``present`` marks, per modality, which rows actually have that modality. An absent row's
    tokens are replaced by a learned ``missing_tokens[name]`` vector, so the fused output of that
    row ignores whatever placeholder input the caller provided (the backbones still run on the
    whole batch, which keeps shapes static). Modalities left out of ``present`` count as present.
    """

    def __init__(
        self,
        backbones: dict[str, VisionTransformer],
        fusion: nn.Module | None = None,
        temporal: dict[str, TemporalEmbedding] | None = None,
    ) -> None:
        super().__init__()
        if not backbones:
            raise ValueError("the encoder needs at least one backbone")
        if len(backbones) == 1 and fusion is not None:
            raise ValueError("a single backbone needs no fusion; pass fusion=None")
        if len(backbones) > 1 and fusion is None:
            raise ValueError(f"backbones {sorted(backbones)} need a fusion module")
        self.patch_size = _shared_value(backbones, "patch_size")
        self.num_register_tokens = _shared_value(backbones, "num_register_tokens")
        self.modalities = sorted(backbones)
        self.backbones = nn.ModuleDict({name: backbones[name] for name in self.modalities})
        self.fusion = fusion
        self.embed_dim = (
            fusion.out_dim if fusion is not None else backbones[self.modalities[0]].embed_dim
        )
        self.n_blocks = max(backbone.n_blocks for backbone in backbones.values())
        if temporal is not None:
            self._check_temporal(backbones, temporal)
        self.temporal = nn.ModuleDict(temporal) if temporal is not None else None
        self.missing_tokens = (
            nn.ParameterDict(
                {
                    name: nn.Parameter(0.02 * torch.randn(backbones[name].embed_dim))
                    for name in self.modalities
                }
            )
            if self.is_multimodal
            else None
        )

    def no_weight_decay(self) -> set[str]:
        """Parameter names trained without weight decay: biases, norms, LayerScale gains.

        The ``missing_tokens`` are learned tokens and decay, like DINOv2's ``cls_token``.
        """
        return weight_decay_exempt(self)

    def forward_flops(
        self, image_size: int, executed: bool = False, batch: int | None = None
    ) -> float:
        """Matmul FLOPs of one image through every backbone; the fusion layers are left out.

        ``executed``/``batch``: what a training forward of ``batch`` images runs (see
        ``VisionTransformer.forward_flops``)."""
        return sum(
            backbone.forward_flops(image_size, executed=executed, batch=batch)
            for backbone in self.backbones.values()
        )

    @property
    def is_multimodal(self) -> bool:
        return len(self.modalities) > 1

    @staticmethod
    def _check_temporal(
        backbones: dict[str, VisionTransformer], temporal: dict[str, TemporalEmbedding]
    ) -> None:
        if set(temporal) != set(backbones):
            raise ValueError(
                f"temporal embeddings {sorted(temporal)} must match backbones {sorted(backbones)}"
            )
        for name, embedding in temporal.items():
            if embedding.embed_dim != backbones[name].embed_dim:
                raise ValueError(
                    f"temporal[{name!r}] has embed_dim {embedding.embed_dim}, "
                    f"backbone has {backbones[name].embed_dim}"
                )

    def _check_images(self, images: dict[str, Tensor]) -> None:
        if set(images) != set(self.modalities):
            raise ValueError(f"expected images for {self.modalities}, got {sorted(images)}")
        sizes = {
            name: (images[name].shape[0], *images[name].shape[-2:]) for name in self.modalities
        }
        if len(set(sizes.values())) != 1:
            raise ValueError(f"co-registered images must share batch, height and width: {sizes}")

    def _check_present(self, present: dict[str, Tensor], batch: int) -> None:
        unknown = set(present) - set(self.modalities)
        if unknown:
            raise ValueError(f"present names unknown modalities {sorted(unknown)}")
        for name, rows in present.items():
            if rows.dtype != torch.bool or tuple(rows.shape) != (batch,):
                raise ValueError(
                    f"present[{name!r}] must be bool of shape ({batch},), "
                    f"got {rows.dtype} {tuple(rows.shape)}"
                )
        if not self.is_multimodal:
            raise ValueError("a unimodal encoder has no modality to drop: pass present=None")
        # Which rows keep which modality is not checked here: reading the masks back would stall
        # an accelerator every step. sample_modality_presence always keeps one per row.

    def forward(
        self,
        images: dict[str, Tensor],
        masks: Tensor | None = None,
        doy: Tensor | None = None,
        present: dict[str, Tensor] | None = None,
        year: Tensor | None = None,
    ) -> dict[str, Tensor | None]:
        """Encode images {name: [B, C_name, H, W]} into DINOv2's token dict.

        ``masks`` [B, N] (iBOT) hides the same patches in every modality, since the grids are
        co-registered. ``doy`` [B] adds each backbone's date embedding to all its tokens; with
        ``doy=None`` (an undated batch) no date bias is added. ``year`` [B] is needed only by
        embeddings built with ``use_year``.

        Unimodal: exactly the backbone's ``forward_features``. Multimodal: ``x_norm_clstoken``
        [B, D], ``x_norm_regtokens`` [B, R, D] and ``x_norm_patchtokens`` [B, N, D] of the fused
        sequence.
        """
        self._check_images(images)
        batch = images[self.modalities[0]].shape[0]
        if present is not None:
            self._check_present(present, batch)
        features = {}
        for name in self.modalities:
            x = images[name]
            bias = None
            if self.temporal is not None and doy is not None:
                bias = self.temporal[name](doy, year, dtype=x.dtype)
            features[name] = self.backbones[name].forward_features(x, masks, token_bias=bias)
        if not self.is_multimodal:
            return features[self.modalities[0]]

        sequences = {}
        for name, out in features.items():
            sequence = torch.cat(
                (
                    out["x_norm_clstoken"].unsqueeze(1),
                    out["x_norm_regtokens"],
                    out["x_norm_patchtokens"],
                ),
                dim=1,
            )
            if present is not None and name in present:
                missing = self.missing_tokens[name].to(sequence.dtype)
                sequence = torch.where(present[name].view(-1, 1, 1), sequence, missing)
            sequences[name] = sequence
        fused = self.fusion(sequences)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": fused[:, 0],
            "x_norm_regtokens": fused[:, 1:first_patch],
            "x_norm_patchtokens": fused[:, first_patch:],
        }


def build_encoder(
    *,
    backbones: dict[str, VisionTransformer],
    fuse_alg: str | None,
    fused_dim: int | None = None,
    xattn_nhead: int = 4,
    xattn_nlayer: int = 1,
    xattn_dropout: float = 0.0,
    temporal: bool = False,
    temporal_use_year: bool = False,
) -> RemoteSensingEncoder:
    """Assemble an encoder from config-level choices.

    ``fuse_alg`` is None for one backbone, "linear" or "xattn" for several; ``fused_dim``
    defaults to the widest backbone. ``temporal`` gives every backbone a date embedding.
    """
    if fuse_alg is None:
        if len(backbones) > 1:
            raise ValueError(f"backbones {sorted(backbones)} need fuse_alg, one of {FUSE_ALGS}")
        if fused_dim is not None:
            raise ValueError("fused_dim applies only with a fuse_alg")
    elif fuse_alg not in FUSE_ALGS:
        raise ValueError(f"Unknown fuse_alg {fuse_alg!r}; expected one of {list(FUSE_ALGS)}")
    elif len(backbones) < 2:
        raise ValueError(f"fuse_alg {fuse_alg!r} needs two backbones, got {sorted(backbones)}")
    if temporal_use_year and not temporal:
        raise ValueError("temporal_use_year needs temporal=True")

    fusion: nn.Module | None = None
    if fuse_alg is not None:
        dims = {name: backbone.embed_dim for name, backbone in backbones.items()}
        out_dim = max(dims.values()) if fused_dim is None else fused_dim
        if fuse_alg == "linear":
            fusion = LinearFusion(dims, out_dim)
        else:
            fusion = CrossAttentionFusion(
                dims, out_dim, nhead=xattn_nhead, nlayer=xattn_nlayer, dropout=xattn_dropout
            )
    embeddings = None
    if temporal:
        embeddings = {
            name: TemporalEmbedding(backbone.embed_dim, use_year=temporal_use_year)
            for name, backbone in backbones.items()
        }
    return RemoteSensingEncoder(backbones, fusion, embeddings)
