"""Student/teacher pair and the DINOv2 objective for one step.

The formulation follows DINOv2 (Oquab et al., 2023): the EMA teacher sees the two global crops and
produces centred (or Sinkhorn-Knopp) targets; the student sees global crops (with iBOT masks) and
local crops; the loss is DINO on [CLS] + iBOT on masked patches + KoLeo on the student's [CLS].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from rsdino.data.masking import IBotMasks
from rsdino.models.build import build_encoder_from_config, build_head
from rsdino.models.encoder import RemoteSensingEncoder
from rsdino.models.encoder_config import StudentConfig
from rsdino.ssl.ema import update_teacher_ema
from rsdino.ssl.loss_config import DinoConfig, IBotConfig
from rsdino.ssl.losses import DinoClsLoss, IBotPatchLoss, KoLeoLoss, normalise_dino_losses

N_GLOBAL_CROPS = 2


@dataclass
class SSLBatch:
    """The views of one step, crop-major (rows v*B .. (v+1)*B-1 hold view v of every sample)."""

    global_crops: dict[str, Tensor]  # modality -> [2B, C, G, G]
    local_crops: dict[str, Tensor] | None  # modality -> [n_local*B, C, L, L]
    masks: IBotMasks | None  # iBOT masks of the global crops
    global_doy: Tensor | None = None  # [2B] day of year, when the encoder embeds time
    local_doy: Tensor | None = None  # [n_local*B]
    global_present: dict[str, Tensor] | None = None  # student-side modality dropout, [2B] bool
    local_present: dict[str, Tensor] | None = None  # [n_local*B] bool
    # Loss weight of each student view (train.clouds.policy=weight); None: all 1. A loss term
    # pairing two views takes the smaller weight: any cloudy view in it scales it.
    global_weight: Tensor | None = None  # [2B]
    local_weight: Tensor | None = None  # [n_local*B]


@dataclass
class TeacherTargets:
    dino: list[Tensor]  # per global view, [B, K]; view order swapped w.r.t. the student
    ibot: Tensor | None  # [M, K] for the masked patches, None when iBOT is off or nothing is masked


def _pair_weights(batch: SSLBatch, n_local: int) -> dict[str, list[list[Tensor]]] | None:
    """Row weights of the DINO pairs from the views' weights: each student row is taught by the
    other global view of its sample (and local crops by both), and a pair takes the smaller."""
    if batch.global_weight is None:
        return None
    student = batch.global_weight
    teacher_views = student.chunk(N_GLOBAL_CROPS)[::-1]  # the order of TeacherTargets.dino
    weights = {"global": [[torch.minimum(student, torch.cat(teacher_views))]]}
    if n_local:
        local = batch.local_weight.chunk(n_local)
        weights["local"] = [[torch.minimum(crop, view) for view in teacher_views] for crop in local]
    return weights


class SSLMetaArch(nn.Module):
    """Holds student, teacher and the loss modules (with their centres) of a DINOv2 run."""

    def __init__(self, cfg: DictConfig) -> None:
        """``cfg`` is the root config: its sections become their dataclasses once, here."""
        super().__init__()
        student_cfg: StudentConfig = OmegaConf.to_object(cfg.student)
        dino: DinoConfig = OmegaConf.to_object(cfg.dino)
        ibot: IBotConfig = OmegaConf.to_object(cfg.ibot)
        self.centering = cfg.train.centering
        self.n_local_crops = cfg.crops.local_crops_number
        self.dino_weight = dino.loss_weight
        self.koleo_weight = dino.koleo_loss_weight
        self.ibot_weight = ibot.loss_weight
        self.ibot_separate_head = ibot.separate_head

        def encoder(drop_path_rate: float, load_pretrained: bool) -> RemoteSensingEncoder:
            return build_encoder_from_config(
                student_cfg,
                multimodal=cfg.train.multimodal,
                img_size=cfg.crops.global_crops_size,
                drop_path_rate=drop_path_rate,
                load_pretrained=load_pretrained,
            )

        student_encoder = encoder(student_cfg.drop_path_rate, load_pretrained=True)
        for backbone in student_encoder.backbones.values():
            # Only the student runs a backward; the teacher has no activations to save.
            backbone.grad_checkpointing = cfg.train.activation_checkpointing
        embed_dim = student_encoder.embed_dim
        student = {"encoder": student_encoder, "dino_head": build_head(dino, embed_dim)}
        teacher = {
            "encoder": encoder(0.0, load_pretrained=False),
            "dino_head": build_head(dino, embed_dim),
        }
        if self.ibot_separate_head:
            student["ibot_head"] = build_head(ibot, embed_dim)
            teacher["ibot_head"] = build_head(ibot, embed_dim)
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

        ibot_prototypes = (
            ibot.head_n_prototypes if self.ibot_separate_head else dino.head_n_prototypes
        )
        self.dino_loss = DinoClsLoss(dino.head_n_prototypes)
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
        self, batch: SSLBatch, masks: IBotMasks | None, teacher_temp: float
    ) -> TeacherTargets:
        """Targets from the teacher, which always sees every modality of both global views."""
        out = self.teacher["encoder"](batch.global_crops, doy=batch.global_doy)
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
        self, batch: SSLBatch, teacher_temp: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the total loss (with graph) and its weighted parts (detached), which sum to it."""
        masks = batch.masks
        if masks is not None and masks.n_masked_patches == 0:
            masks = None  # nothing masked in this batch: the iBOT term is absent, not NaN
        targets = self.teacher_targets(batch, masks, teacher_temp)

        encoder = self.student["encoder"]
        out_global = encoder(
            batch.global_crops,
            masks=None if masks is None else masks.masks,
            doy=batch.global_doy,
            present=batch.global_present,
        )
        cls_global = out_global["x_norm_clstoken"]
        cls_inputs = [cls_global]
        if self.n_local_crops > 0 and batch.local_crops is not None:
            out_local = encoder(batch.local_crops, doy=batch.local_doy, present=batch.local_present)
            cls_inputs.append(out_local["x_norm_clstoken"])
        patches = None
        if masks is not None:
            flat_patches = out_global["x_norm_patchtokens"].flatten(0, 1)
            patches = flat_patches.index_select(0, masks.mask_indices)
        cls_logits, patch_logits = self._heads_on(self.student, torch.cat(cls_inputs), patches)
        cls_logits = cls_logits.float()
        n_global_rows = cls_global.shape[0]
        global_logits, local_logits = cls_logits[:n_global_rows], cls_logits[n_global_rows:]

        n_local = self.n_local_crops if local_logits.shape[0] else 0
        weights = _pair_weights(batch, n_local)
        global_loss = self.dino_loss(
            [global_logits], [torch.cat(targets.dino)], weights and weights["global"]
        )
        local_loss = (
            self.dino_loss(
                list(local_logits.chunk(n_local)), targets.dino, weights and weights["local"]
            )
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
            patch_weight = masks.masks_weight
            if batch.global_weight is not None:  # each masked patch takes its view's weight
                image = masks.mask_indices // masks.masks.shape[1]
                patch_weight = patch_weight * batch.global_weight.to(patch_weight)[image]
            parts["ibot"] = self.ibot_weight * self.ibot_loss.forward_masked(
                patch_logits.float(), targets.ibot, patch_weight, n_images=n_global_rows
            )
        elif self.uses_ibot:
            parts["ibot"] = global_loss.new_zeros(())  # keeps the logged parts the same each step
        total = torch.stack(list(parts.values())).sum()
        return total, {name: value.detach() for name, value in parts.items()}

    def compile_blocks(self) -> None:
        """torch.compile the transformer blocks of every student and teacher backbone."""
        for side in (self.student, self.teacher):
            for backbone in side["encoder"].backbones.values():
                backbone.compile_blocks()

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_teacher_ema(
            list(self.student.parameters()), list(self.teacher.parameters()), momentum
        )
