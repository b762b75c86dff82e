"""Weighted k-nearest-neighbour classification on frozen features (DINO's kNN evaluation)."""

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of a cosine-similarity kNN vote.

    Each test sample's ``k`` most similar training samples vote for their label with weight
    ``exp(similarity / temperature)``; a tie between classes goes to the smaller class id. Test
    samples are processed ``chunk_size`` at a time so the similarity matrix stays bounded.
    ``num_classes`` defaults to the largest training label + 1.
    """
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1, got k={k}, chunk_size={chunk_size}")
    if test_features.shape[0] == 0 or train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training and one test sample")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.to(train.device).long()
    test_labels = test_labels.to(train.device).long()

    correct = 0
    for start in range(0, test.shape[0], chunk_size):
        chunk = test[start : start + chunk_size].to(train.device)
        similarity, neighbours = (chunk @ train.t()).topk(k, dim=1)
        votes = similarity.new_zeros(chunk.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        predictions = votes.argmax(dim=1)
        correct += int((predictions == test_labels[start : start + chunk_size]).sum())
    return correct / test.shape[0]
