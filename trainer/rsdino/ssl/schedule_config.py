"""The optimiser and teacher schedule configs (``optim.*``, ``teacher.*``), torch-free.

``ssl/schedules.py`` turns them into per-step values; epochs are ``train.OFFICIAL_EPOCH_LENGTH``
steps, as in DINOv2.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsdino.config.component import Checks

LR_SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")


@dataclass
class OptimConfig:
    """AdamW with DINOv2's cosine schedules, layer-wise lr decay and per-module clipping."""

    epochs: int = 100
    """Length of the run in epochs."""
    weight_decay: float = 0.04
    """Weight decay at the start, cosine-scheduled to ``weight_decay_end``."""
    weight_decay_end: float = 0.4
    """Weight decay at the last step."""
    base_lr: float = 0.004
    """Peak learning rate for a global batch of 1024, before ``scaling_rule``."""
    warmup_epochs: float = 10
    """Linear learning-rate warm-up from 0, then cosine decay to ``min_lr``."""
    min_lr: float = 1.0e-06
    """Learning rate at the last step."""
    clip_grad: float = 3.0
    """Max gradient norm of each student module (backbone, each head) on its own; 0: off."""
    freeze_last_layer_epochs: float = 1
    """The DINO head's last layer gets no updates for this long."""
    scaling_rule: str = "sqrt_wrt_1024"
    """How ``base_lr`` scales with the global batch: sqrt_wrt_1024, linear_wrt_256 or none."""
    patch_embed_lr_mult: float = 0.2
    """Learning-rate factor of the patch embedding."""
    layerwise_decay: float = 0.9
    """Learning-rate factor per block counted from the top (1: none)."""
    adamw_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adamw_beta2: float = 0.999
    """AdamW's second-moment decay."""

    def __post_init__(self) -> None:
        checks = Checks("optim")
        checks.choice("scaling_rule", self.scaling_rule, LR_SCALING_RULES)
        checks.require(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        checks.require(self.base_lr > 0, "base_lr", "must be > 0", self.base_lr)
        checks.require(
            0 <= self.warmup_epochs <= self.epochs,
            "warmup_epochs",
            f"must be in [0, optim.epochs={self.epochs}]",
            self.warmup_epochs,
        )
        checks.require(
            self.clip_grad >= 0, "clip_grad", "must be >= 0 (0 disables)", self.clip_grad
        )
        checks.require(
            0 < self.layerwise_decay <= 1,
            "layerwise_decay",
            "must be in (0, 1]",
            self.layerwise_decay,
        )
        checks.require(
            self.patch_embed_lr_mult >= 0,
            "patch_embed_lr_mult",
            "must be >= 0",
            self.patch_embed_lr_mult,
        )
        for key in ("adamw_beta1", "adamw_beta2"):
            value = getattr(self, key)
            checks.require(0 <= value < 1, key, "must be in [0, 1)", value)
        checks.raise_any()


@dataclass
class TeacherConfig:
    """The EMA teacher: its momentum and its softmax temperature over the run."""

    momentum_teacher: float = 0.992
    """EMA momentum at the start, cosine-scheduled to ``final_momentum_teacher``."""
    final_momentum_teacher: float = 1.0
    """EMA momentum at the last step."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at the start, raised linearly to ``teacher_temp``."""
    teacher_temp: float = 0.07
    """Teacher temperature after the warm-up."""
    warmup_teacher_temp_epochs: float = 30
    """Length of the temperature warm-up."""

    def __post_init__(self) -> None:
        checks = Checks("teacher")
        for key in ("momentum_teacher", "final_momentum_teacher"):
            value = getattr(self, key)
            checks.require(0.0 <= value <= 1.0, key, "must be in [0, 1]", value)
        for key in ("teacher_temp", "warmup_teacher_temp"):
            value = getattr(self, key)
            checks.require(value > 0, key, "must be > 0", value)
        checks.require(
            self.warmup_teacher_temp_epochs >= 0,
            "warmup_teacher_temp_epochs",
            "must be >= 0",
            self.warmup_teacher_temp_epochs,
        )
        checks.raise_any()
