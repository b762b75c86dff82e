"""Weighted k-nearest-neighbour classification on frozen features (DINO's kNN evaluation)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rsdino.eval.metrics import mean_average_precision

DINOV2_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_votes(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    ks: tuple[int, ...] = DINOV2_KS,
    *,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Per k, the vote mass of every class for every test sample: {k: [N_test, C]}.

    ``train_targets`` is one-hot or multi-hot [N_train, C]. Each test sample's k most
    cosine-similar training samples vote with weight ``exp(similarity / temperature)``. The
    neighbours are found once for the largest k; smaller k use the nearest of those. k above
    the training set size is capped to it.
    """
    if not ks or min(ks) < 1 or chunk_size < 1:
        raise ValueError(f"ks and chunk_size must be >= 1, got ks={ks}, chunk_size={chunk_size}")
    if test_features.shape[0] == 0 or train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training and one test sample")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    targets = train_targets.float().to(train.device)
    k_max = min(max(ks), train.shape[0])
    votes: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, test.shape[0], chunk_size):
        chunk = test[start : start + chunk_size].to(train.device)
        similarity, neighbours = (chunk @ train.t()).topk(k_max, dim=1)
        weighted = (similarity / temperature).exp().unsqueeze(-1) * targets[neighbours]
        for k in ks:
            votes[k].append(weighted[:, : min(k, k_max)].sum(dim=1).cpu())
    return {k: torch.cat(parts) for k, parts in votes.items()}


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    **options: Any,
) -> dict[int, float]:
    """Top-1 accuracy per k of single-label classification; ``options`` as `knn_predict`."""
    predicted = knn_predict(train_features, train_labels, test_features, **options)
    labels = test_labels.long()
    return {k: float((p == labels).float().mean()) for k, p in predicted.items()}


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    ks: tuple[int, ...] = DINOV2_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Per k, the class id [N_test] the vote picks (ties to the smaller id)."""
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    one_hot = F.one_hot(train_labels.long(), num_classes)
    votes = knn_votes(
        train_features, one_hot, test_features, ks, temperature=temperature, chunk_size=chunk_size
    )
    return {k: v.argmax(dim=1) for k, v in votes.items()}


def knn_multilabel(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    *,
    ks: tuple[int, ...] = DINOV2_KS,
    temperature: float = 0.07,
) -> dict[int, dict[str, float]]:
    """Macro and micro mAP per k, ranking each class by its share of the neighbours' votes."""
    # A column of ones collects each sample's total vote weight in the same pass.
    with_total = torch.cat((train_targets.float(), torch.ones(len(train_targets), 1)), dim=1)
    votes = knn_votes(train_features, with_total, test_features, ks, temperature=temperature)
    return {
        k: mean_average_precision(mass[:, :-1] / mass[:, -1:], test_targets)
        for k, mass in votes.items()
    }
