"""The run-level keys of ``train.*`` (batch, devices, precision, logging), torch-free: the loader
checks them before any import of torch. The sub-sections of ``train`` (dataset, storage,
synthetic, clouds, views) own their configs beside their components."""

from __future__ import annotations

from dataclasses import dataclass

from rsdino.config.component import Checks

CENTERING_MODES = ("centering", "sinkhorn_knopp")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
REDUCE_PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("auto", "true", "false")


@dataclass
class RunConfig:
    """How one training run is laid out on its devices and what it logs."""

    multimodal: bool = False
    """True: one ViT per modality (S1 SAR + S2 optical), fused; false: Sentinel-2 alone."""
    modality_dropout: float = 0.0
    """Multimodal: probability that a student view shows one modality only."""
    batch_size_per_gpu: int = 64
    """Samples per rank and step; the global batch is this times the world size."""
    num_workers: int = 8
    """Data-loading worker processes; 0 loads in the training process."""
    OFFICIAL_EPOCH_LENGTH: int = 1250
    """Iterations per "epoch" for all epoch-based schedules (DINOv2's name)."""
    seed: int = 0
    """Seeds the weights, the data order and every step's random stream."""
    centering: str = "centering"
    """Teacher centering: centering (EMA centre) or sinkhorn_knopp."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    precision: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp32), bf16 or fp32."""
    reduce_precision: str = "fp32"
    """Multi-GPU: dtype FSDP2 reduces gradients in, fp32 or bf16."""
    activation_checkpointing: bool = False
    """Recompute student block activations in backward (less memory, more compute)."""
    compile: str = "auto"
    """torch.compile each transformer block: auto (on CUDA only), true, false."""
    log_every_steps: int = 10
    """Progress line period, in steps."""
    loss_spike_factor: float = 10.0
    """A checkpoint saved while the loss is over this x its recent median is not "good":
    divergence errors name the last good one; 0: off."""
    collective_timeout_s: int = 600
    """A collective (NCCL/gloo) waiting longer for a dead peer fails the rank with exit code 200,
    so the job restarts instead of hanging."""

    def __post_init__(self) -> None:
        checks = Checks("train")
        checks.require(
            0.0 <= self.modality_dropout < 1.0,
            "modality_dropout",
            "must be in [0, 1)",
            self.modality_dropout,
        )
        checks.require(
            self.multimodal or self.modality_dropout == 0,
            "modality_dropout",
            "needs train.multimodal=true",
            self.modality_dropout,
        )
        for key in (
            "batch_size_per_gpu",
            "OFFICIAL_EPOCH_LENGTH",
            "log_every_steps",
            "collective_timeout_s",
        ):
            checks.require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key))
        checks.require(self.num_workers >= 0, "num_workers", "must be >= 0", self.num_workers)
        checks.require(
            self.loss_spike_factor >= 0, "loss_spike_factor", "must be >= 0", self.loss_spike_factor
        )
        checks.choice("centering", self.centering, CENTERING_MODES)
        checks.choice("device", self.device, DEVICES)
        checks.choice("precision", self.precision, PRECISIONS)
        checks.choice("reduce_precision", self.reduce_precision, REDUCE_PRECISIONS)
        # A YAML `true` arrives as "True" in this string key.
        checks.choice("compile", str(self.compile).lower(), COMPILE_MODES)
        checks.raise_any()
