"""Linear segmentation probe: a per-token linear classifier on frozen patch tokens.

Logits on the patch grid are upsampled bilinearly to the mask's resolution and trained with
cross-entropy (``ignore_index`` pixels excluded), one head per learning rate, all in one pass;
the head with the best validation mIoU is reported on test with per-class IoU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsdino.eval.linear import ProbeResult
from rsdino.eval.metrics import confusion_matrix, iou_from_confusion

DEFAULT_SEG_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def segment(head: nn.Linear, tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """Logits [B, C, H, W] of tokens [B, h, w, D] upsampled to the mask size."""
    logits = head(tokens.float()).permute(0, 3, 1, 2)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate_head(
    head: nn.Linear,
    tokens: Tensor,
    masks: Tensor,
    num_classes: int,
    ignore_index: int | None,
    batch_size: int = 64,
) -> dict:
    """mIoU, per-class IoU and pixel accuracy of one head over a split."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, tokens.shape[0], batch_size):
        logits = segment(head, tokens[start : start + batch_size], tuple(masks.shape[-2:]))
        confusion += confusion_matrix(
            logits.argmax(dim=1), masks[start : start + batch_size], num_classes, ignore_index
        )
    return iou_from_confusion(confusion)


def train_segmentation_probes(
    train: dict[str, Tensor],
    val: dict[str, Tensor],
    test: dict[str, Tensor],
    *,
    num_classes: int,
    ignore_index: int | None = None,
    lrs: tuple[float, ...] = DEFAULT_SEG_LRS,
    epochs: int = 20,
    batch_size: int = 16,
    seed: int = 0,
) -> ProbeResult:
    """AdamW linear heads on ``train["patch"]`` [N, h, w, D] against ``train["mask"]`` [N, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    tokens, masks = train["patch"], train["mask"].long()
    heads = nn.ModuleList()
    for _ in lrs:
        head = nn.Linear(tokens.shape[-1], num_classes)
        with torch.no_grad():
            head.weight.normal_(0.0, 0.01, generator=generator)
            head.bias.zero_()
        heads.append(head)
    optimizer = torch.optim.AdamW(
        [
            {"params": h.parameters(), "lr": lr, "base_lr": lr}
            for h, lr in zip(heads, lrs, strict=True)
        ],
        weight_decay=1e-4,
    )
    n = tokens.shape[0]
    total_steps = max(1, epochs * math.ceil(n / batch_size))
    step = 0
    ignore = -100 if ignore_index is None else ignore_index
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            batch_tokens, batch_masks = tokens[rows].float(), masks[rows]
            loss = sum(
                F.cross_entropy(
                    segment(head, batch_tokens, tuple(batch_masks.shape[-2:])),
                    batch_masks,
                    ignore_index=ignore,
                )
                for head in heads
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    grid = []
    for head, lr in zip(heads, lrs, strict=True):
        metrics = evaluate_head(head, val["patch"], val["mask"], num_classes, ignore_index)
        grid.append({"lr": lr, "val": {"miou": metrics["miou"]}})
    best_index = max(range(len(grid)), key=lambda i: _or_minus_one(grid[i]["val"]["miou"]))
    test_metrics = evaluate_head(
        heads[best_index], test["patch"], test["mask"], num_classes, ignore_index
    )
    best = {"lr": lrs[best_index], "val": grid[best_index]["val"], "test": test_metrics}
    return ProbeResult(best=best, grid=grid)


def _or_minus_one(value: float) -> float:
    return -1.0 if math.isnan(value) else value
