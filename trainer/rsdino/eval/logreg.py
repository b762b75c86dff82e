"""L2-regularised logistic regression on frozen [CLS] features, fitted with torch's L-BFGS.

DINOv2's log_regression fits a multinomial model per regularisation strength and picks it on a
validation split; the same is done here on the CPU or GPU with no extra dependency. Features are
standardised with the training mean and std first, so one grid of strengths fits all models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsdino.eval.linear import ProbeResult, chosen_head_score, feature_set, score

DEFAULT_L2 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def fit_logistic_regression(
    x: Tensor,
    targets: Tensor,
    num_classes: int,
    *,
    l2: float,
    multilabel: bool = False,
    max_iter: int = 200,
) -> tuple[Tensor, Tensor]:
    """Weights [D, C] and bias [C] minimising mean cross-entropy (or BCE) + l2/2 * |W|^2."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    x = x.double()
    targets = targets.double() if multilabel else targets.long()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = x @ weight + bias
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def logistic_regression_probe(
    train: dict[str, Tensor],
    val: dict[str, Tensor],
    test: dict[str, Tensor],
    *,
    target: str,
    num_classes: int,
    l2_grid: tuple[float, ...] = DEFAULT_L2,
    features: str = "cls",
    max_iter: int = 200,
) -> ProbeResult:
    """Fit one model per strength in ``l2_grid``; report the best on validation on test."""
    multilabel = target == "labels"
    x_train = feature_set(train, features)
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-6)

    def standardised(split: dict[str, Tensor]) -> Tensor:
        return ((feature_set(split, features) - mean) / std).double()

    key = "map_macro" if multilabel else "accuracy"
    grid, models = [], []
    for l2 in l2_grid:
        weight, bias = fit_logistic_regression(
            standardised(train),
            train[target],
            num_classes,
            l2=l2,
            multilabel=multilabel,
            max_iter=max_iter,
        )
        models.append((weight, bias))
        metrics = score(standardised(val) @ weight + bias, val[target], multilabel)
        grid.append({"features": features, "l2": l2, "val": metrics})
    best_index = max(range(len(grid)), key=lambda i: grid[i]["val"][key])
    weight, bias = models[best_index]
    test_metrics = chosen_head_score(standardised(test) @ weight + bias, test[target], multilabel)
    best = {**grid[best_index], "test": test_metrics}
    return ProbeResult(best=best, grid=grid)
