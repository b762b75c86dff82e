"""Shared fixtures: a tiny DINOv2 config that trains a few steps in seconds on CPU."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import DictConfig

from rsdino.config.loader import load_config
from rsdino.data.augment import MultiCropAugment
from rsdino.data.augment_config import AugmentConfig, CropsConfig
from rsdino.data.storage import open_store
from rsdino.train.checkpoint import CheckpointInfo, CheckpointStore, read_tensors

TINY_OVERRIDES = [
    "train.device=cpu",
    "train.num_workers=0",
    "train.batch_size_per_gpu=4",
    "train.OFFICIAL_EPOCH_LENGTH=3",
    "train.log_every_steps=1",
    "train.synthetic.num_samples=64",
    "train.synthetic.tile_size=32",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "checkpoint.every_steps=2",
    "checkpoint.keep=3",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "metrics.enabled=false",  # tests that need the exporter turn it on with their own port
    "curves.tensorboard=false",  # likewise the curves (tests/test_curves.py)
]


def train_command(output_dir: Path, *overrides: str) -> list[str]:
    """`rsdino train --config quickstart` as one process, as a user types it."""
    return [sys.executable, "-m", "rsdino.cli", *_train_args(output_dir, overrides)]


def _train_args(output_dir: Path, overrides: tuple[str, ...]) -> list[str]:
    return ["train", "--config", "quickstart", "--output-dir", str(output_dir), *overrides]


def torchrun_train_command(
    n_procs: int, output_dir: Path, *overrides: str, torchrun_args: tuple[str, ...] = ()
) -> list[str]:
    """`rsdino train --config quickstart` under ``rsdino-torchrun`` with ``n_procs`` local ranks."""
    return [
        sys.executable,
        "-m",
        "rsdino.launch",
        "--standalone",
        f"--nproc-per-node={n_procs}",
        *torchrun_args,
        "-m",
        "rsdino.cli",
        *_train_args(output_dir, overrides),
    ]


def tiny_config(*extra: str) -> DictConfig:
    return load_config("quickstart", [*TINY_OVERRIDES, *extra])


@pytest.fixture
def tiny_cfg() -> DictConfig:
    return tiny_config()


def tiny_multimodal_config(*extra: str) -> DictConfig:
    return load_config(
        "quickstart_multimodal",
        [*TINY_OVERRIDES, "student.xattn.nhead=2", "student.xattn.nlayer=1", *extra],
    )


def saved_tensors(checkpoints: Path | str, step: int, prefix: str = "model.") -> dict:
    """Whole tensors under ``prefix`` of the step's checkpoint in a checkpoint root."""
    store = CheckpointStore(open_store(str(checkpoints)))
    return read_tensors(store, step, prefix)


def saved_info(checkpoints: Path | str, step: int) -> CheckpointInfo:
    return CheckpointStore(open_store(str(checkpoints))).read_info(step)


def multicrop(
    global_crops_size: int,
    local_crops_size: int,
    local_crops_number: int,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    **settings: object,
) -> MultiCropAugment:
    """A MultiCropAugment from flat keyword settings, each sent to the config that owns it."""
    crop_keys = {spec.name for spec in fields(CropsConfig)}
    crops = CropsConfig(
        global_crops_size=global_crops_size,
        local_crops_size=local_crops_size,
        local_crops_number=local_crops_number,
        **{key: list(value) for key, value in settings.items() if key in crop_keys},
    )
    augment = AugmentConfig(**{k: v for k, v in settings.items() if k not in crop_keys})
    return MultiCropAugment(crops, augment, ratio)
