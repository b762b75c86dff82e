import math
from typing import Any

import torch

from rsdino.eval.knn import knn_classify


def knn_accuracy(*tensors: torch.Tensor, k: int, **options: Any) -> float:
    """The library's top-1 accuracy at one k."""
    return knn_classify(*tensors, ks=(k,), **options)[k]


def test_separable_clusters_are_classified_perfectly() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5
    train_labels = torch.arange(3).repeat_interleave(10)
    test_labels = torch.arange(3).repeat_interleave(4)
    train = centres[train_labels] + 0.1 * torch.randn(30, 3, generator=generator)
    test = centres[test_labels] + 0.1 * torch.randn(12, 3, generator=generator)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, k=5, chunk_size=5)
    assert accuracy == 1.0


def _unit(angle_degrees: float) -> list[float]:
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


def test_weighted_votes_beat_majority() -> None:
    # Query at 0 degrees. Neighbours: class 1 at 10 degrees (cos 0.985), class 0 at 60 and
    # 70 degrees (cos 0.5, 0.342). With T = 0.1 the single close vote wins:
    # exp(9.85) = 18_980 > exp(5) + exp(3.42) = 179.
    train = torch.tensor([_unit(10), _unit(60), _unit(70), _unit(180)])
    train_labels = torch.tensor([1, 0, 0, 0])
    query = torch.tensor([_unit(0)])
    assert knn_accuracy(train, train_labels, query, torch.tensor([1]), k=3, temperature=0.1) == 1.0
    # With a huge temperature all weights are ~1, so the majority (class 0) wins instead.
    assert knn_accuracy(train, train_labels, query, torch.tensor([0]), k=3, temperature=1e6) == 1.0


def test_exact_tie_goes_to_smaller_class_and_k_is_capped() -> None:
    # Two neighbours at +30 and -30 degrees have equal weights; k = 10 > 2 training samples.
    train = torch.tensor([_unit(30), _unit(-30)])
    train_labels = torch.tensor([2, 1])
    queries = torch.tensor([_unit(0), _unit(0)])
    accuracy = knn_accuracy(train, train_labels, queries, torch.tensor([1, 2]), k=10)
    assert accuracy == 0.5


def test_features_are_cosine_normalised() -> None:
    # By Euclidean distance the query (10, 0) is closer to (5, 5); by angle to (0.1, 0).
    train = torch.tensor([[0.1, 0.0], [5.0, 5.0]])
    train_labels = torch.tensor([0, 1])
    accuracy = knn_accuracy(
        train, train_labels, torch.tensor([[10.0, 0.0]]), torch.tensor([0]), k=1, num_classes=4
    )
    assert accuracy == 1.0
