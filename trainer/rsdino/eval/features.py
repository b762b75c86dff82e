"""Frozen-encoder features for probes, per modality mode, cached on disk per model and dataset.

A multimodal encoder is evaluated three ways: with both modalities ("s1+s2"), and with one of
them replaced by the encoder's learned missing-modality token ("s2", "s1"), exactly as modality
dropout presents a missing sensor during training.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from rsdino.data.bands import BandNormalizer
from rsdino.data.collate import collate_samples
from rsdino.errors import RsdinoError

log = logging.getLogger(__name__)

TARGET_FIELDS = ("label", "labels", "mask")
CACHE_VERSION = "rsdino.eval.features/1"


def modes_of(encoder: nn.Module, available: tuple[str, ...]) -> list[str]:
    """Modality modes an encoder can be evaluated in, given the modalities the data has."""
    names = list(encoder.modalities)
    if len(names) == 1:
        if names[0] not in available:
            raise RsdinoError(
                f"the model reads {names[0]} but the dataset has only {', '.join(available)}"
            )
        return names
    modes = ["+".join(names)] if set(names) <= set(available) else []
    return modes + [name for name in sorted(names, reverse=True) if name in available]


def input_size(tile: int, patch_size: int) -> int:
    """The tile side the ViT sees: the tile itself, or the nearest multiple of the patch size."""
    return (
        tile if tile % patch_size == 0 else max(patch_size, round(tile / patch_size) * patch_size)
    )


class Progress:
    """A one-line progress bar on stderr (results go to stdout, so they stay clean)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.started = time.perf_counter()

    def advance(self, count: int) -> None:
        self.done += count
        width = 24
        filled = width * self.done // max(self.total, 1)
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        bar = "#" * filled + "." * (width - filled)
        end = "\n" if self.done >= self.total else ""
        print(
            f"\r{self.label} [{bar}] {self.done}/{self.total} ({rate:.0f}/s)",
            end=end,
            file=sys.stderr,
            flush=True,
        )


def _encoder_inputs(
    batch: dict, encoder: nn.Module, mode: str, normalizers: dict[str, BandNormalizer], device
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Normalised images for every modality the encoder has; absent ones as zeros + present."""
    wanted = mode.split("+")
    reference = batch[wanted[0]]
    size = input_size(reference.shape[-1], encoder.patch_size)
    images, present = {}, {}
    for name in encoder.modalities:
        if name in wanted:
            x = normalizers[name](batch[name].to(device))
            if x.shape[-1] != size or x.shape[-2] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        else:
            bands = normalizers[name].num_bands
            x = torch.zeros(reference.shape[0], bands, size, size, device=device)
            present[name] = torch.zeros(reference.shape[0], dtype=torch.bool, device=device)
        images[name] = x
    return images, (present or None)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    normalizers: dict[str, BandNormalizer],
    *,
    mode: str | None = None,
    patch_tokens: bool = False,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    label: str = "features",
    num_workers: int = 0,
    use_time: bool | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """{"cls": [N, D], "patch_mean": [N, D], optional "patch": [N, h, w, D], and the target}.

    ``mode`` is "s1+s2", "s2" or "s1" (default: all of the encoder's modalities). The day of
    year is passed to encoders that embed it when the samples carry one (``use_time`` None),
    or as ``use_time`` says. ``progress`` draws a bar on stderr (off inside a training run).
    """
    encoder.eval().to(device)
    mode = mode or "+".join(encoder.modalities)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_samples,
        num_workers=num_workers,
    )
    if use_time is None:
        use_time = getattr(encoder, "temporal", None) is not None
    parts: dict[str, list[Tensor]] = {}
    bar = Progress(label, len(dataset)) if progress else None
    for batch in loader:
        images, present = _encoder_inputs(batch, encoder, mode, normalizers, device)
        doy = batch["doy"].to(device) if use_time and "doy" in batch else None
        out = encoder(images, doy=doy, present=present)
        patches = out["x_norm_patchtokens"].float()
        found = {"cls": out["x_norm_clstoken"].float(), "patch_mean": patches.mean(dim=1)}
        if patch_tokens:
            side = next(iter(images.values())).shape[-1] // encoder.patch_size
            found["patch"] = patches.reshape(patches.shape[0], side, side, -1).half()
        for field in TARGET_FIELDS:
            if field in batch:
                found[field] = batch[field]
        for name, value in found.items():
            parts.setdefault(name, []).append(value.cpu())
        if bar is not None:
            bar.advance(len(batch["key"]))
    return {name: torch.cat(values) for name, values in parts.items()}


class FeatureCache:
    """Features saved as ``<dir>/<hash>.pt``, the hash over model, data, split and options.

    The model identity must change whenever the weights do (export file size and time, or a
    checkpoint's location and step), the data identity whenever the samples do.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    @staticmethod
    def key(*parts: object) -> str:
        text = "|".join([CACHE_VERSION, *map(str, parts)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load_or_compute(self, key: str, compute) -> dict[str, Tensor]:
        if self.directory is None:
            return compute()
        path = self.directory / f"{key}.pt"
        if path.is_file():
            try:
                found = torch.load(path, map_location="cpu", weights_only=True)
                log.info("features from cache %s", path)
                return found
            except (OSError, RuntimeError, EOFError) as error:
                log.warning("ignoring unreadable feature cache %s (%s)", path, error)
        found = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        torch.save(found, partial)
        partial.replace(path)
        return found
