"""The Prometheus exporter and curve-writer configs (``metrics.*``, ``curves.*``), torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from rsdino.config.component import Checks

TENSORBOARD_MODES = ("auto", "true", "false")
_HIGHEST_PORT = 65535


@dataclass
class MetricsConfig:
    """One ``/metrics`` endpoint per rank (rsdino_* families), for Prometheus to scrape."""

    enabled: bool = True
    """Every rank serves /metrics on port + local rank; false: no exporter."""
    host: str = "auto"
    """auto: 127.0.0.1 for one process, 0.0.0.0 under torchrun/srun; else the address to bind."""
    port: int | None = None
    """null: 9321, or the next free port for one process; a number is used as given."""
    job: str = "rsdino"
    """Value of the job label on every sample (scrape with honor_labels)."""
    peak_flops_per_device: float = 0.0
    """Peak FLOP/s of one device, for rsdino_mfu_ratio; 0: unknown, no MFU."""

    def __post_init__(self) -> None:
        checks = Checks("metrics")
        checks.require(bool(self.host), "host", "must be auto or an address", self.host)
        if self.port is not None:
            ok = 1 <= self.port <= _HIGHEST_PORT
            checks.require(ok, "port", f"must be null or in [1, {_HIGHEST_PORT}]", self.port)
        checks.require(bool(self.job), "job", "must be a non-empty label value", self.job)
        checks.require(
            self.peak_flops_per_device >= 0,
            "peak_flops_per_device",
            "must be >= 0 (0: unknown)",
            self.peak_flops_per_device,
        )
        checks.raise_any()


@dataclass
class CurvesConfig:
    """Loss and schedule curves, written by rank 0 at every logging interval."""

    tensorboard: str = "auto"
    """auto: <output-dir>/tensorboard when tensorboard is installed; true; false."""
    wandb: bool = False
    """Log to Weights & Biases too (needs wandb; WANDB_MODE=offline logs without an account)."""
    wandb_project: str = "rsdino"
    """The Weights & Biases project."""

    def __post_init__(self) -> None:
        checks = Checks("curves")
        # A YAML `true` arrives as "True" in this string field.
        checks.choice("tensorboard", str(self.tensorboard).lower(), TENSORBOARD_MODES)
        checks.require(
            bool(self.wandb_project), "wandb_project", "must not be empty", self.wandb_project
        )
        checks.raise_any()
