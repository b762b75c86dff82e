"""The DINO and iBOT loss and head configs (``dino.*``, ``ibot.*``), torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from rsdino.config.component import Checks


def _check_head(checks: Checks, n_prototypes: int, n_layers: int, loss_weight: float) -> None:
    checks.require(n_prototypes >= 1, "head_n_prototypes", "must be >= 1", n_prototypes)
    checks.require(n_layers >= 1, "head_nlayers", "must be >= 1", n_layers)
    checks.require(loss_weight >= 0, "loss_weight", "must be >= 0", loss_weight)


@dataclass
class DinoConfig:
    """The [CLS] objective: the DINO head's prototypes and the loss weights."""

    loss_weight: float = 1.0
    """Weight of the DINO [CLS] loss (global + local crops)."""
    head_n_prototypes: int = 65536
    """K, the DINO head's output dimension."""
    head_bottleneck_dim: int = 256
    """Width of the head's L2-normalised bottleneck before the prototypes."""
    head_nlayers: int = 3
    """Layers of the head's MLP."""
    head_hidden_dim: int = 2048
    """Hidden width of the head's MLP."""
    koleo_loss_weight: float = 0.1
    """KoLeo regulariser on the student's global [CLS] tokens; 0 disables it."""

    def __post_init__(self) -> None:
        checks = Checks("dino")
        _check_head(checks, self.head_n_prototypes, self.head_nlayers, self.loss_weight)
        checks.require(
            self.koleo_loss_weight >= 0, "koleo_loss_weight", "must be >= 0", self.koleo_loss_weight
        )
        checks.raise_any()


@dataclass
class IBotConfig:
    """The masked-patch objective: which global crops get masks, and its head."""

    loss_weight: float = 1.0
    """Weight of the iBOT masked-patch loss; 0 disables masking and the loss."""
    mask_sample_probability: float = 0.5
    """Fraction of the global-crop images that get a mask."""
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    """Masked fraction of patches, stratified over the masked images, [min, max]."""
    separate_head: bool = False
    """False: iBOT shares the DINO head; true: it has its own (the ``head_*`` keys)."""
    head_n_prototypes: int = 65536
    """Output dimension of the separate iBOT head."""
    head_bottleneck_dim: int = 256
    """Bottleneck width of the separate iBOT head."""
    head_nlayers: int = 3
    """Layers of the separate iBOT head's MLP."""
    head_hidden_dim: int = 2048
    """Hidden width of the separate iBOT head's MLP."""

    def __post_init__(self) -> None:
        checks = Checks("ibot")
        _check_head(checks, self.head_n_prototypes, self.head_nlayers, self.loss_weight)
        checks.probability("mask_sample_probability", self.mask_sample_probability)
        checks.interval("mask_ratio_min_max", self.mask_ratio_min_max, 0.0, 1.0, low_ok=True)
        checks.raise_any()
