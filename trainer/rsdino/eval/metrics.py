"""Probe metrics: accuracy and confusion, average precision (macro and micro mAP), segmentation
IoU."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def accuracy(scores: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy in [0, 1] of class scores [N, C] against class ids [N]."""
    return float((scores.argmax(dim=1) == targets.long()).float().mean())


def classification_metrics(predictions: Tensor, targets: Tensor, num_classes: int) -> dict:
    """Accuracy and the [C, C] confusion counts (rows true, columns predicted) of class ids:
    the matrix says which classes a representation mixes up, which accuracy alone hides."""
    confusion = confusion_matrix(predictions, targets, num_classes)
    return {
        "accuracy": float(confusion.diagonal().sum()) / max(1, int(confusion.sum())),
        "confusion": confusion.tolist(),
    }


def average_precision(scores: Tensor, targets: Tensor) -> float:
    """Area under the precision-recall curve of one class, as scikit-learn defines it.

    AP = sum over thresholds of (recall gain) x (precision there); samples with the same score
    enter at the same threshold, so the result does not depend on their order. NaN when the
    class has no positive sample.
    """
    positives = float(targets.sum())
    if positives == 0:
        return math.nan
    order = torch.argsort(scores.double(), descending=True, stable=True)
    sorted_scores = scores.double()[order]
    hits = targets.double()[order]
    true_pos = torch.cumsum(hits, 0)
    # The last sample of each run of equal scores is where that threshold's counts are read.
    last_of_run = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_run[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    true_pos = true_pos[last_of_run]
    seen = torch.arange(1, len(scores) + 1, dtype=torch.float64)[last_of_run]
    precision = true_pos / seen
    recall = true_pos / positives
    recall_gain = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_gain * precision).sum())


def mean_average_precision(scores: Tensor, targets: Tensor) -> dict[str, float]:
    """Macro mAP (mean of per-class AP over classes with a positive) and micro mAP (AP of all
    (sample, class) pairs pooled), of scores and multi-hot targets [N, C]."""
    per_class = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    defined = [value for value in per_class if not math.isnan(value)]
    if not defined:
        raise ValueError("no class has a positive sample, so mAP is undefined")
    return {
        "map_macro": sum(defined) / len(defined),
        "map_micro": average_precision(scores.flatten(), targets.flatten()),
    }


def confusion_matrix(
    predictions: Tensor, targets: Tensor, num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """[C, C] pixel counts, rows the true class and columns the predicted one."""
    predictions, targets = predictions.flatten().long(), targets.flatten().long()
    if ignore_index is not None:
        keep = targets != ignore_index
        predictions, targets = predictions[keep], targets[keep]
    counts = torch.bincount(targets * num_classes + predictions, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(confusion: Tensor) -> dict[str, float | list[float]]:
    """Per-class IoU = TP / (TP + FP + FN) and their mean over the classes that occur.

    A class absent from both the truth and the predictions has no IoU (NaN) and is left out of
    the mean, as in mmsegmentation.
    """
    confusion = confusion.double()
    true_pos = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_pos
    per_class = [
        float(tp / u) if u > 0 else math.nan for tp, u in zip(true_pos, union, strict=True)
    ]
    defined = [value for value in per_class if not math.isnan(value)]
    total = float(confusion.sum())
    return {
        "miou": sum(defined) / len(defined) if defined else math.nan,
        "per_class_iou": per_class,
        "pixel_accuracy": float(true_pos.sum()) / total if total else math.nan,
    }
