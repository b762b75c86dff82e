"""The checkpoint config (``checkpoint.*``), torch-free: the loader checks it before any import
of torch, ``train/checkpoint.py`` saves by it."""

from __future__ import annotations

from dataclasses import dataclass

from rsdino.config.component import Checks


@dataclass
class CheckpointConfig:
    """When to save, how many saves to keep, and where."""

    every_steps: int = 1250
    """Save every N steps, and at the last step."""
    keep: int = 3
    """Newest complete checkpoints kept; older ones are deleted once a newer one is complete."""
    dir: str = ""
    """"" = <output-dir>/checkpoints; else a shared path or s3://bucket/prefix."""
    async_save: bool = True
    """Write in a background thread; training waits only for the copy to host memory."""

    def __post_init__(self) -> None:
        checks = Checks("checkpoint")
        checks.require(self.every_steps >= 1, "every_steps", "must be >= 1", self.every_steps)
        checks.require(self.keep >= 1, "keep", "must be >= 1", self.keep)
        checks.raise_any()
