"""Probe maths on hand-made features and predictions: kNN, linear, logreg, mAP, IoU."""

from __future__ import annotations

import math

import pytest
import torch

from rsdino.eval.knn import knn_classify, knn_multilabel
from rsdino.eval.linear import train_linear_probes
from rsdino.eval.logreg import logistic_regression_probe
from rsdino.eval.metrics import (
    average_precision,
    classification_metrics,
    confusion_matrix,
    iou_from_confusion,
    mean_average_precision,
)
from rsdino.eval.segmentation import train_segmentation_probes


def test_average_precision_by_hand() -> None:
    # Positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert average_precision(scores, torch.tensor([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # A tie at 0.5 between a positive and a negative enters as one threshold: P = 2/3 there.
    tied = torch.tensor([0.9, 0.5, 0.5, 0.1])
    assert average_precision(tied, torch.tensor([1, 1, 0, 0])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(tied, torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert math.isnan(average_precision(scores, torch.zeros(4)))


def test_map_macro_and_micro_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.3, 0.0], [0.6, 0.4, 0.0]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    result = mean_average_precision(scores, targets)
    # Class 0: 5/6; class 1: its only positive ranks first, 1; class 2 has no positive: left out.
    assert result["map_macro"] == pytest.approx((5 / 6 + 1) / 2)
    # Pooled ranking: + - + - + then negatives; AP = (1/1 + 2/3 + 3/5) / 3.
    assert result["map_micro"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_accuracy_and_confusion_by_hand() -> None:
    predictions = torch.tensor([0, 0, 1, 2, 2, 1])
    targets = torch.tensor([0, 1, 1, 2, 0, 1])
    metrics = classification_metrics(predictions, targets, num_classes=3)
    # Rows are true classes: one 0 taken for a 2, one 1 taken for a 0.
    assert metrics["confusion"] == [[1, 0, 1], [1, 2, 0], [0, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)


def test_iou_by_hand_with_ignore_index() -> None:
    targets = torch.tensor([[0, 0, 1], [1, 255, 2]])
    predictions = torch.tensor([[0, 1, 1], [1, 0, 0]])
    confusion = confusion_matrix(predictions, targets, num_classes=4, ignore_index=255)
    assert int(confusion.sum()) == 5
    result = iou_from_confusion(confusion)
    iou = result["per_class_iou"]
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(iou[3])
    assert result["miou"] == pytest.approx(1 / 3)  # class 3 occurs nowhere: left out
    assert result["pixel_accuracy"] == pytest.approx(3 / 5)


def _clusters(n_per_class: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    centres = 4 * torch.eye(classes, 16)
    return centres[labels] + 0.2 * torch.randn(len(labels), 16, generator=generator), labels


def test_knn_separable_is_perfect_and_shuffled_is_chance() -> None:
    train_x, train_y = _clusters(30, 5, seed=0)
    test_x, test_y = _clusters(10, 5, seed=1)
    ks = (10, 20, 100, 200)
    assert knn_classify(train_x, train_y, test_x, test_y, ks=ks) == dict.fromkeys(ks, 1.0)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(2))]
    chance = knn_classify(train_x, shuffled, test_x, test_y, ks=(10, 20))
    assert all(value < 0.45 for value in chance.values()), chance  # chance is 0.2


def _locally_mixed(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Linearly separable by one weak coordinate; neighbours are decided by 30 noisy ones."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    signal = (2.0 * labels - 1.0).unsqueeze(1) * 0.5
    noise = 3.0 * torch.randn(n, 30, generator=generator)
    cls = torch.cat((signal, noise), dim=1)
    return {"cls": cls, "patch_mean": torch.randn(n, 4, generator=generator), "label": labels}


def test_linear_and_logreg_beat_knn_when_separable_but_locally_mixed() -> None:
    train, val, test = (_locally_mixed(n, seed) for n, seed in ((400, 0), (100, 1), (200, 2)))
    knn = knn_classify(train["cls"], train["label"], test["cls"], test["label"], ks=(20,))[20]
    linear = train_linear_probes(
        train, val, test, target="label", num_classes=2, lrs=(0.01, 0.1), epochs=30
    )
    logreg = logistic_regression_probe(
        train, val, test, target="label", num_classes=2, l2_grid=(1e-4, 1e-2)
    )
    assert knn < 0.7
    assert linear.best["test"]["accuracy"] > 0.95 and logreg.best["test"]["accuracy"] > 0.95
    for result in (linear, logreg):  # the chosen head's test confusion counts every test sample
        confusion = torch.tensor(result.best["test"]["confusion"])
        assert confusion.sum() == 200
        assert confusion.trace() / 200 == pytest.approx(result.best["test"]["accuracy"])
    assert {row["features"] for row in linear.grid} == {"cls", "cls+avgpool"}
    assert len(linear.grid) == 4 and len(logreg.grid) == 2


def test_multilabel_probes_report_map() -> None:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> dict[str, torch.Tensor]:
        x = torch.randn(n, 8, generator=generator)
        targets = (x[:, :3] > 0).float()
        return {"cls": x, "patch_mean": x, "labels": targets}

    train, val, test = split(300), split(80), split(120)
    linear = train_linear_probes(
        train, val, test, target="labels", num_classes=3, lrs=(0.1,), epochs=20
    )
    assert linear.best["test"]["map_macro"] > 0.95 and linear.best["test"]["map_micro"] > 0.95
    knn = knn_multilabel(train["cls"], train["labels"], test["cls"], test["labels"], ks=(10,))
    assert 0.6 < knn[10]["map_macro"] <= 1.0


def test_segmentation_probe_learns_token_classes() -> None:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> dict[str, torch.Tensor]:
        classes = torch.randint(0, 3, (n, 4, 4), generator=generator)
        tokens = 3 * torch.nn.functional.one_hot(classes, 8).float()
        tokens += 0.1 * torch.randn(tokens.shape, generator=generator)
        mask = classes.repeat_interleave(2, 1).repeat_interleave(2, 2)
        mask[:, 0, 0] = 255
        return {"patch": tokens.half(), "mask": mask}

    train, val, test = split(40), split(10), split(10)
    result = train_segmentation_probes(
        train, val, test, num_classes=3, ignore_index=255, lrs=(1e-2, 3e-2), epochs=15
    )
    assert len(result.best["test"]["per_class_iou"]) == 3
    assert result.best["test"]["miou"] > 0.6  # bilinear upsampling blurs the tile borders
