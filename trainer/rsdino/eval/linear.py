"""Linear probes on frozen features, as DINOv2's linear evaluation runs them.

Heads on [CLS] and on [CLS] + mean patch token, one per learning rate of a grid, train together
in one pass over the cached features (each head only receives its own loss's gradient). The head
with the best validation score is reported on the test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsdino.eval.metrics import accuracy, classification_metrics, mean_average_precision

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
FEATURE_SETS = ("cls", "cls+avgpool")


def feature_set(features: dict[str, Tensor], name: str) -> Tensor:
    """The input of a head: the [CLS] token, or [CLS] concatenated with the mean patch token."""
    if name == "cls":
        return features["cls"].float()
    if name == "cls+avgpool":
        return torch.cat((features["cls"], features["patch_mean"]), dim=1).float()
    raise ValueError(f"unknown feature set {name!r}; expected one of {FEATURE_SETS}")


def score(logits: Tensor, targets: Tensor, multilabel: bool) -> dict[str, float]:
    """The probe's metrics: accuracy, or macro and micro mAP for multi-label targets."""
    if multilabel:
        return mean_average_precision(torch.sigmoid(logits), targets)
    return {"accuracy": accuracy(logits, targets)}


def chosen_head_score(logits: Tensor, targets: Tensor, multilabel: bool) -> dict:
    """The chosen head's metrics on test: `score`, plus the confusion counts of single-label
    targets (validation entries of the grid leave them out, to keep the report short)."""
    if multilabel:
        return score(logits, targets, multilabel)
    return classification_metrics(logits.argmax(dim=1), targets, logits.shape[1])


@dataclass(frozen=True)
class ProbeResult:
    """The chosen head's test metrics and every head's validation metrics."""

    best: dict
    grid: list[dict]


def train_linear_probes(
    train: dict[str, Tensor],
    val: dict[str, Tensor],
    test: dict[str, Tensor],
    *,
    target: str,
    num_classes: int,
    lrs: tuple[float, ...] = DEFAULT_LRS,
    feature_sets: tuple[str, ...] = FEATURE_SETS,
    epochs: int = 50,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> ProbeResult:
    """Train one linear head per (feature set, lr) with SGD + momentum and a cosine schedule.

    ``target`` is "label" (cross-entropy) or "labels" (multi-hot, BCE). Selection is by
    validation accuracy, or macro mAP for multi-label.
    """
    multilabel = target == "labels"
    generator = torch.Generator().manual_seed(seed)
    inputs = {name: feature_set(train, name) for name in feature_sets}
    heads, groups, specs = nn.ModuleList(), [], []
    for name in feature_sets:
        for lr in lrs:
            head = nn.Linear(inputs[name].shape[1], num_classes)
            with torch.no_grad():
                head.weight.normal_(0.0, 0.01, generator=generator)
                head.bias.zero_()
            heads.append(head)
            groups.append({"params": head.parameters(), "lr": lr, "base_lr": lr})
            specs.append((name, lr))
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    targets = train[target].float() if multilabel else train[target].long()
    n = targets.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            loss = sum(
                _loss(head(inputs[name][rows]), targets[rows], multilabel)
                for head, (name, _) in zip(heads, specs, strict=True)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return _select(heads, specs, val, test, target, multilabel)


def _loss(logits: Tensor, targets: Tensor, multilabel: bool) -> Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def _select(
    heads: nn.ModuleList,
    specs: list[tuple[str, float]],
    val: dict[str, Tensor],
    test: dict[str, Tensor],
    target: str,
    multilabel: bool,
) -> ProbeResult:
    key = "map_macro" if multilabel else "accuracy"
    grid = []
    for head, (name, lr) in zip(heads, specs, strict=True):
        metrics = score(head(feature_set(val, name)), val[target], multilabel)
        grid.append({"features": name, "lr": lr, "val": metrics})
    best_index = max(range(len(grid)), key=lambda i: grid[i]["val"][key])
    name, lr = specs[best_index]
    test_metrics = chosen_head_score(
        heads[best_index](feature_set(test, name)), test[target], multilabel
    )
    best = {"features": name, "lr": lr, "val": grid[best_index]["val"], "test": test_metrics}
    return ProbeResult(best=best, grid=grid)
