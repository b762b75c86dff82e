import pytest
import torch
from torch import nn

from rsdino.ssl.param_groups import apply_optim_schedule, build_param_groups, layer_id


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.ls1 = _LayerScale(dim)


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(2, dim, kernel_size=2, stride=2)


class _Backbone(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = _PatchEmbed(dim)
        self.blocks = nn.ModuleList([_Block(dim), _Block(dim)])
        self.norm = nn.LayerNorm(dim)


class _Head(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(dim, dim)
        self.last_layer = nn.Linear(dim, 3, bias=False)


class _Student(nn.Module):
    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.backbone = _Backbone(dim)
        self.dino_head = _Head(dim)


def _groups_by_name(groups: list[dict]) -> dict[str, dict]:
    return {name: group for group in groups for name in group["names"]}


def test_layer_id_handles_prefixes_and_chunks() -> None:
    assert layer_id("backbone.cls_token", 12) == 0
    assert layer_id("student.backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id("register_tokens", 12) == 0
    assert layer_id("backbone.mask_token", 12) == 0
    assert layer_id("backbone.blocks.3.attn.qkv.weight", 12) == 4
    assert layer_id("student.backbone.blocks.1.7.mlp.fc1.bias", 12) == 8  # chunk 1, block 7
    assert layer_id("backbone.blocks.0.ls1.gamma", 12) == 1
    assert layer_id("backbone.norm.weight", 12) == 13
    assert layer_id("dino_head.last_layer.weight", 12) == 13


def test_param_groups_multipliers_on_tiny_model() -> None:
    model = _Student()
    groups = build_param_groups(
        model.named_parameters(), num_layers=2, layerwise_decay=0.5, patch_embed_lr_mult=0.2
    )
    by_name = _groups_by_name(groups)
    expected_lr = {
        "backbone.cls_token": 0.125,
        "backbone.pos_embed": 0.125,
        "backbone.patch_embed.proj.weight": 0.125 * 0.2,
        "backbone.patch_embed.proj.bias": 0.125 * 0.2,
        "backbone.blocks.0.fc.weight": 0.25,
        "backbone.blocks.0.norm1.weight": 0.25,
        "backbone.blocks.0.ls1.gamma": 0.25,
        "backbone.blocks.1.fc.weight": 0.5,
        "backbone.norm.weight": 1.0,
        "dino_head.mlp.weight": 1.0,
        "dino_head.last_layer.weight": 1.0,
    }
    for name, lr_multiplier in expected_lr.items():
        assert by_name[name]["lr_multiplier"] == pytest.approx(lr_multiplier), name
    no_decay = {
        "backbone.cls_token",
        "backbone.pos_embed",
        "backbone.patch_embed.proj.bias",
        "backbone.blocks.0.norm1.weight",
        "backbone.blocks.0.norm1.bias",
        "backbone.blocks.0.fc.bias",
        "backbone.blocks.1.ls1.gamma",
        "backbone.norm.weight",
        "dino_head.mlp.bias",
    }
    decay = {
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.fc.weight",
        "dino_head.mlp.weight",
        "dino_head.last_layer.weight",
    }
    assert all(by_name[name]["wd_multiplier"] == 0.0 for name in no_decay)
    assert all(by_name[name]["wd_multiplier"] == 1.0 for name in decay)
    last_layer_names = {name for name, group in by_name.items() if group["is_last_layer"]}
    assert last_layer_names == {"dino_head.last_layer.weight"}


def test_param_groups_fuse_equal_settings_and_skip_frozen() -> None:
    model = _Student()
    model.backbone.pos_embed.requires_grad_(False)
    groups = build_param_groups(
        model.named_parameters(), num_layers=2, layerwise_decay=0.5, patch_embed_lr_mult=0.2
    )
    all_names = [name for group in groups for name in group["names"]]
    assert "backbone.pos_embed" not in all_names
    assert len(all_names) == len(set(all_names)) == len(list(model.parameters())) - 1
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    # Block 0's weight (decay) and its norm/bias/gamma (no decay) form exactly two groups.
    block0 = [g for g in groups if g["lr_multiplier"] == 0.25]
    assert sorted(len(g["params"]) for g in block0) == [1, 4]
    assert all(len(g["params"]) == len(g["names"]) for g in groups)


def test_apply_optim_schedule_sets_lr_and_wd_per_group() -> None:
    model = _Student()
    groups = build_param_groups(
        model.named_parameters(), num_layers=2, layerwise_decay=0.5, patch_embed_lr_mult=0.2
    )
    optimizer = torch.optim.AdamW(groups)
    apply_optim_schedule(optimizer, lr=0.1, wd=0.05, last_layer_lr=0.0)
    by_name = _groups_by_name(optimizer.param_groups)
    assert by_name["backbone.blocks.0.fc.weight"]["lr"] == pytest.approx(0.025)
    assert by_name["backbone.blocks.0.fc.weight"]["weight_decay"] == pytest.approx(0.05)
    assert by_name["backbone.patch_embed.proj.weight"]["lr"] == pytest.approx(0.0025)
    assert by_name["backbone.norm.weight"]["weight_decay"] == 0.0
    assert by_name["dino_head.mlp.weight"]["lr"] == pytest.approx(0.1)
    assert by_name["dino_head.last_layer.weight"]["lr"] == 0.0
    assert by_name["dino_head.last_layer.weight"]["weight_decay"] == pytest.approx(0.05)
