"""Optimizer parameter groups with DINOv2's layer-wise lr decay and weight-decay exemptions.

Each group carries multipliers instead of absolute values; :func:`apply_optim_schedule` turns the
scheduled lr and weight decay into per-group values every iteration. As in DINOv2, only biases,
norms and LayerScale gains skip weight decay; learned tokens decay.
"""

import torch
from torch import nn

from rsdino.models.layers import PatchEmbed


def _reports(model: nn.Module, method: str) -> dict[str, object]:
    """What ``model``'s parts say of their parameters through ``method``, by full name.

    A part reports names relative to itself, as a set (each name then maps to True) or as a
    dict of values; parts without the method say nothing.
    """
    found: dict[str, object] = {}
    for prefix, module in model.named_modules():
        report = getattr(module, method, None)
        if callable(report):
            told = report()
            pairs = told.items() if isinstance(told, dict) else ((name, True) for name in told)
            found.update((f"{prefix}.{name}" if prefix else name, value) for name, value in pairs)
    return found


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters ``model``'s parts exempt from weight decay (``no_weight_decay()``, timm's
    convention); a parameter that no part names decays."""
    return set(_reports(model, "no_weight_decay"))


def layerwise_lr_steps(model: nn.Module) -> dict[str, int]:
    """Decay factors of each parameter's lr, as ``model``'s backbones report them
    (``VisionTransformer.layerwise_lr_steps``); a parameter no backbone reports (fusion, missing
    modality tokens, heads) sits above every block and keeps the full lr."""
    return {name: int(n) for name, n in _reports(model, "layerwise_lr_steps").items()}


def frozen_at_start_names(model: nn.Module) -> set[str]:
    """Parameters ``model``'s heads freeze early (``DINOHead.frozen_at_start()``)."""
    return set(_reports(model, "frozen_at_start"))


def patch_embed_names(model: nn.Module) -> set[str]:
    """Parameters of every patch embedding in ``model``, found by type."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, PatchEmbed)
        for name, _ in module.named_parameters()
    }


def build_param_groups(
    model: nn.Module,
    *,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
) -> list[dict]:
    """One optimizer group per (lr multiplier, wd multiplier, is-last-layer) combination.

    The weight-decay exemptions and the lr depths are what the model's parts report
    (:func:`no_weight_decay_names`, :func:`layerwise_lr_steps`); the patch embedding's lr is
    further scaled by ``patch_embed_lr_mult``.
    Each group has ``params``, ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer`` (the DINO
    head's ``last_layer``, gain and direction, which DINOv2 freezes early in training) and
    ``names`` for inspection. Parameters that do not require gradients are left out.
    """
    exempt_names = no_weight_decay_names(model)
    lr_steps, patch_embed = layerwise_lr_steps(model), patch_embed_names(model)
    last_layer = frozen_at_start_names(model)
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (
            layerwise_decay ** lr_steps.get(name, 0)
            * (patch_embed_lr_mult if name in patch_embed else 1.0),
            0.0 if name in exempt_names else 1.0,
            name in last_layer,
        )
        if key not in groups:
            lr_mult, wd_mult, is_last_layer = key
            groups[key] = {
                "params": [],
                "lr_multiplier": lr_mult,
                "wd_multiplier": wd_mult,
                "is_last_layer": is_last_layer,
                "names": [],
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def apply_optim_schedule(
    optimizer: torch.optim.Optimizer, *, lr: float, wd: float, last_layer_lr: float
) -> None:
    """Set each group's lr and weight decay from this iteration's scheduled values."""
    for group in optimizer.param_groups:
        base_lr = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base_lr * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
