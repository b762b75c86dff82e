"""Frozen-encoder feature extraction for probes (kNN now, linear later)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from rsdino.data.bands import BandNormalizer
from rsdino.data.collate import collate_samples


@torch.no_grad()
def extract_cls_features(
    encoder: nn.Module,
    dataset: Dataset,
    normalizers: dict[str, BandNormalizer],
    *,
    use_time: bool = False,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """[CLS] features and labels of every sample, in dataset order.

    ``normalizers`` names the modalities the encoder reads; ``use_time`` passes each sample's
    day of year to encoders that embed it.
    """
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    features, labels = [], []
    for batch in loader:
        images = {name: norm(batch[name].to(device)) for name, norm in normalizers.items()}
        doy = batch["doy"].to(device) if use_time else None
        features.append(encoder(images, doy=doy)["x_norm_clstoken"].float().cpu())
        labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels)
