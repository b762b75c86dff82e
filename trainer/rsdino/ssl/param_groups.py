"""Optimizer parameter groups with DINOv2's layer-wise lr decay and weight-decay exemptions.

Each group carries multipliers instead of absolute values; :func:`apply_optim_schedule` turns the
scheduled lr and weight decay into per-group values every iteration. As in DINOv2, only biases,
norms and LayerScale gains skip weight decay; learned tokens decay.
"""

import torch
from torch import nn

_TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "register_tokens")


def _is_patch_embed(parts: list[str]) -> bool:
    return "patch_embed" in parts


def layer_id(name: str, num_layers: int) -> int:
    """Depth for lr decay: 0 for embeddings, ``i + 1`` for block ``i``, ``num_layers + 1`` else.

    Works with any prefix (``backbone.``, ``student.backbone.``) and with chunked blocks
    ``blocks.<chunk>.<i>.*``, whose inner index is already the global block index. The encoder's
    ``missing_tokens`` stand in for a backbone's output at the fusion, so like the fusion (and
    like any backbone parameter DINOv2 does not list as an embedding) they get the top depth.
    """
    parts = name.split(".")
    if _is_patch_embed(parts) or any(token in parts for token in _TOKEN_NAMES):
        return 0
    if "blocks" in parts:
        after = parts[parts.index("blocks") + 1 :]
        if len(after) >= 2 and after[0].isdigit() and after[1].isdigit():
            return int(after[1]) + 1
        if after and after[0].isdigit():
            return int(after[0]) + 1
    return num_layers + 1


def _lr_multiplier(name: str, num_layers: int, layerwise_decay: float, patch_mult: float) -> float:
    """Deeper layers keep more of the lr; the patch embedding gets an extra (smaller) factor."""
    multiplier = layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers))
    if _is_patch_embed(name.split(".")):
        multiplier *= patch_mult
    return multiplier


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that ``model``'s parts exempt from weight decay.

    Every submodule with a ``no_weight_decay()`` method (timm's convention) names its own exempt
    parameters, relative to itself; a parameter that no part names decays.
    """
    exempt: set[str] = set()
    for prefix, module in model.named_modules():
        report = getattr(module, "no_weight_decay", None)
        if callable(report):
            exempt.update(f"{prefix}.{name}" if prefix else name for name in report())
    return exempt


def build_param_groups(
    model: nn.Module,
    *,
    num_layers: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
) -> list[dict]:
    """One optimizer group per (lr multiplier, wd multiplier, is-last-layer) combination.

    The weight-decay exemptions are what the model's parts report (:func:`no_weight_decay_names`).
    Each group has ``params``, ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer`` (the DINO
    head's ``last_layer``, gain and direction, which DINOv2 freezes early in training) and
    ``names`` for inspection. Parameters that do not require gradients are left out.
    """
    exempt_names = no_weight_decay_names(model)
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (
            _lr_multiplier(name, num_layers, layerwise_decay, patch_embed_lr_mult),
            0.0 if name in exempt_names else 1.0,
            "last_layer" in name.split("."),
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
