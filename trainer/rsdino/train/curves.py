"""Loss and learning-rate curves where people look at them: TensorBoard and Weights & Biases.

Rank 0 writes one point per logging interval, the same numbers as ``train_log.jsonl``. Both
backends are optional packages: ``tensorboard: auto`` writes event files under
``<output-dir>/tensorboard`` when the tensorboard package is installed; ``true`` (and
``wandb: true``) require it and fail at start-up naming the package to install. A resumed run
continues the same curves: TensorBoard shows the redone steps again from the resumed step, and
the wandb run id is derived from the output directory so it resumes the same wandb run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rsdino.config.loader import ConfigError

log = logging.getLogger("rsdino")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _required(key: str, package: str) -> None:
    if not _installed(package):
        raise ConfigError(
            f"{key}=true but the {package} package is not installed; pip install {package} "
            f"(or pip install 'rsdino[curves]'), or set {key}=false"
        )


class CurveWriters:
    """The enabled curve backends of one run (rank 0 only; other ranks get none)."""

    def __init__(self, cfg: DictConfig, output_dir: Path, enabled: bool = True) -> None:
        settings = cfg.curves
        self._tensorboard: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        mode = str(settings.tensorboard).lower()  # a YAML `true` arrives as "True"
        if mode == "true":
            _required("curves.tensorboard", "tensorboard")
        if mode == "true" or (mode == "auto" and _installed("tensorboard")):
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
            log.info("TensorBoard curves in %s", output_dir / "tensorboard")
        if settings.wandb:
            _required("curves.wandb", "wandb")
            import wandb

            run_id = hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:16]
            self._wandb = wandb.init(
                project=settings.wandb_project,
                dir=str(output_dir),
                id=run_id,
                resume="allow",
                config=OmegaConf.to_container(cfg, resolve=True),
            )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """One point per curve at ``step`` (losses under loss/, schedules under schedule/)."""
        for name, value in values.items():
            tag = f"loss/{name}" if name not in _SCHEDULES else f"schedule/{name}"
            if self._tensorboard is not None:
                self._tensorboard.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


_SCHEDULES = {"lr", "wd", "momentum", "teacher_temp", "samples_per_s"}
