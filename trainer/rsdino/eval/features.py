"""Frozen-backbone feature extraction for probes (kNN now, linear later)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from rsdino.data.bands import BandNormalizer
from rsdino.data.collate import collate_samples


@torch.no_grad()
def extract_cls_features(
    backbone: nn.Module,
    dataset: Dataset,
    normalizer: BandNormalizer,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Normalised [CLS] features and labels of every sample, in dataset order."""
    backbone.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    features, labels = [], []
    for batch in loader:
        images = normalizer(batch["s2"].to(device))
        features.append(backbone(images).float().cpu())
        labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels)
