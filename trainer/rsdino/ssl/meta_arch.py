"""Student/teacher pair and the DINOv2 objective for one step.

The formulation follows DINOv2 (Oquab et al., 2023): the EMA teacher sees the two global crops and
produces centred (or Sinkhorn-Knopp) targets; the student sees global crops (with iBOT masks) and
local crops; the loss is DINO on [CLS] + iBOT on masked patches + KoLeo on the student's [CLS].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from rsdino.data.masking import IBotMasks
from rsdino.errors import RsdinoError
from rsdino.models.heads import DINOHead
from rsdino.models.pretrained import load_pretrained_backbone
from rsdino.models.vit import VisionTransformer, build_vit
from rsdino.ssl.ema import update_teacher_ema
from rsdino.ssl.losses import DinoClsLoss, IBotPatchLoss, KoLeoLoss, normalise_dino_losses

N_GLOBAL_CROPS = 2


def build_backbone(cfg: DictConfig, *, drop_path_rate: float) -> VisionTransformer:
    """The ViT described by ``cfg.student``; ``drop_path_rate`` differs for student and teacher."""
    s = cfg.student
    return build_vit(
        s.arch,
        img_size=cfg.crops.global_crops_size,
        patch_size=s.patch_size,
        in_chans=s.in_chans,
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


def _load_pretrained(backbone: VisionTransformer, student_cfg: DictConfig) -> None:
    path = student_cfg.pretrained_weights
    try:
        load_pretrained_backbone(
            backbone,
            path,
            patch_embed_adapt=student_cfg.pretrained_patch_embed_adapt,
            rgb_band_indices=tuple(student_cfg.pretrained_rgb_band_indices),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise RsdinoError(
            f"cannot load student.pretrained_weights='{path}': {exc}. Point it at a DINOv2-format "
            "backbone checkpoint that matches student.arch/patch_size, or set it to ''."
        ) from exc


def _build_head(head_cfg: DictConfig, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=head_cfg.head_n_prototypes,
        nlayers=head_cfg.head_nlayers,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
    )


@dataclass
class TeacherTargets:
    dino: list[Tensor]  # per global view, [B, K]; view order swapped w.r.t. the student
    ibot: Tensor | None  # [M, K] for the masked patches, None when iBOT is off or nothing is masked


class SSLMetaArch(nn.Module):
    """Holds student, teacher and the loss modules (with their centres) of a DINOv2 run."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.centering = cfg.train.centering
        self.n_local_crops = cfg.crops.local_crops_number
        self.dino_weight = cfg.dino.loss_weight
        self.koleo_weight = cfg.dino.koleo_loss_weight
        self.ibot_weight = cfg.ibot.loss_weight
        self.ibot_separate_head = cfg.ibot.separate_head

        student_backbone = build_backbone(cfg, drop_path_rate=cfg.student.drop_path_rate)
        if cfg.student.pretrained_weights:
            _load_pretrained(student_backbone, cfg.student)
        embed_dim = student_backbone.embed_dim
        student = {"backbone": student_backbone, "dino_head": _build_head(cfg.dino, embed_dim)}
        teacher = {
            "backbone": build_backbone(cfg, drop_path_rate=0.0),
            "dino_head": _build_head(cfg.dino, embed_dim),
        }
        if self.ibot_separate_head:
            student["ibot_head"] = _build_head(cfg.ibot, embed_dim)
            teacher["ibot_head"] = _build_head(cfg.ibot, embed_dim)
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

        ibot_prototypes = (
            cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        )
        self.dino_loss = DinoClsLoss(cfg.dino.head_n_prototypes)
        self.ibot_loss = IBotPatchLoss(ibot_prototypes)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> SSLMetaArch:
        """The teacher is never in training mode: it has no dropout and must stay deterministic."""
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def uses_ibot(self) -> bool:
        return self.ibot_weight > 0

    def _heads_on(self, heads: nn.ModuleDict, cls: Tensor, patches: Tensor | None) -> tuple:
        """Run the DINO head on [CLS] tokens and the iBOT head (shared or separate) on patches."""
        if patches is None:
            return heads["dino_head"](cls), None
        if self.ibot_separate_head:
            return heads["dino_head"](cls), heads["ibot_head"](patches)
        logits = heads["dino_head"](torch.cat([cls, patches]))
        return logits[: cls.shape[0]], logits[cls.shape[0] :]

    @torch.no_grad()
    def teacher_targets(
        self, global_crops: Tensor, masks: IBotMasks | None, teacher_temp: float
    ) -> TeacherTargets:
        out = self.teacher["backbone"](global_crops, is_training=True)
        # Each view is taught by the other one: swap the two halves of the batch.
        cls = torch.cat(out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)[::-1])
        patches = None
        if masks is not None:
            flat_patches = out["x_norm_patchtokens"].flatten(0, 1)
            patches = flat_patches.index_select(0, masks.mask_indices)
        cls_logits, patch_logits = self._heads_on(self.teacher, cls, patches)
        cls_logits = cls_logits.float()

        if self.centering == "centering":
            dino_probs = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
        else:
            dino_probs = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
        ibot_probs = None
        if patch_logits is not None:
            patch_logits = patch_logits.float()
            if self.centering == "centering":
                ibot_probs = self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
                self.ibot_loss.update_center(patch_logits)
            else:
                n_masked = torch.tensor(patch_logits.shape[0], device=patch_logits.device)
                ibot_probs = self.ibot_loss.sinkhorn_knopp_teacher(
                    patch_logits, teacher_temp, n_masked_patches_tensor=n_masked
                )
        return TeacherTargets(dino=list(dino_probs.chunk(N_GLOBAL_CROPS)), ibot=ibot_probs)

    def compute_losses(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None,
        masks: IBotMasks | None,
        teacher_temp: float,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the total loss (with graph) and its weighted parts (detached), which sum to it."""
        if masks is not None and masks.n_masked_patches == 0:
            masks = None  # nothing masked in this batch: the iBOT term is absent, not NaN
        targets = self.teacher_targets(global_crops, masks, teacher_temp)

        student = self.student["backbone"]
        out_global = student(
            global_crops, masks=None if masks is None else masks.masks, is_training=True
        )
        cls_global = out_global["x_norm_clstoken"]
        cls_inputs = [cls_global]
        if self.n_local_crops > 0 and local_crops is not None:
            cls_inputs.append(student(local_crops, is_training=True)["x_norm_clstoken"])
        patches = None
        if masks is not None:
            flat_patches = out_global["x_norm_patchtokens"].flatten(0, 1)
            patches = flat_patches.index_select(0, masks.mask_indices)
        cls_logits, patch_logits = self._heads_on(self.student, torch.cat(cls_inputs), patches)
        cls_logits = cls_logits.float()
        n_global_rows = cls_global.shape[0]
        global_logits, local_logits = cls_logits[:n_global_rows], cls_logits[n_global_rows:]

        n_local = self.n_local_crops if local_logits.shape[0] else 0
        global_loss = self.dino_loss([global_logits], [torch.cat(targets.dino)])
        local_loss = (
            self.dino_loss(list(local_logits.chunk(n_local)), targets.dino)
            if n_local
            else torch.zeros_like(global_loss)
        )
        global_loss, local_loss = normalise_dino_losses(
            global_loss, local_loss, n_global_crops=N_GLOBAL_CROPS, n_local_crops=n_local
        )
        parts: dict[str, Tensor] = {"dino_global": self.dino_weight * global_loss}
        if n_local:
            parts["dino_local"] = self.dino_weight * local_loss
        if self.koleo_weight > 0:
            koleo = sum(self.koleo_loss(view.float()) for view in cls_global.chunk(N_GLOBAL_CROPS))
            parts["koleo"] = self.koleo_weight * koleo
        if patch_logits is not None and targets.ibot is not None and masks is not None:
            parts["ibot"] = self.ibot_weight * self.ibot_loss.forward_masked(
                patch_logits.float(), targets.ibot, masks.masks_weight, n_images=n_global_rows
            )
        elif self.uses_ibot:
            parts["ibot"] = global_loss.new_zeros(())  # keeps the logged parts the same each step
        total = torch.stack(list(parts.values())).sum()
        return total, {name: value.detach() for name, value in parts.items()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_teacher_ema(
            list(self.student.parameters()), list(self.teacher.parameters()), momentum
        )
