"""Optimizer groups on the real student: DINOv2's weight-decay exemptions and lr multipliers."""

import pytest
import torch
from conftest import tiny_config, tiny_multimodal_config
from omegaconf import DictConfig

from rsdino.models.vit import build_vit
from rsdino.ssl.meta_arch import SSLMetaArch
from rsdino.ssl.param_groups import (
    apply_optim_schedule,
    build_param_groups,
    layerwise_lr_steps,
    no_weight_decay_names,
)

LAYERSCALE = "student.layerscale=1.0e-5"
STUDENTS = {
    "unimodal": lambda: tiny_config(LAYERSCALE, "student.num_register_tokens=2"),
    "separate_ibot_head": lambda: tiny_config(
        LAYERSCALE,
        "ibot.separate_head=true",
        "ibot.head_n_prototypes=32",
        "ibot.head_hidden_dim=32",
        "ibot.head_bottleneck_dim=16",
    ),
    "multimodal_xattn_temporal": lambda: tiny_multimodal_config(
        LAYERSCALE, "student.fuse_alg=xattn", "student.temporal_embedding=true"
    ),
    "multimodal_linear": lambda: tiny_multimodal_config(LAYERSCALE),
}


def _student(cfg: DictConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return SSLMetaArch(cfg).student


def _groups(student: torch.nn.Module, **overrides: float) -> list[dict]:
    options = {"layerwise_decay": 0.5, "patch_embed_lr_mult": 0.2, **overrides}
    return build_param_groups(student, **options)


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {name: group for group in groups for name in group["names"]}


def _dinov2_exempt(name: str) -> bool:
    """DINOv2's ``get_params_groups_with_decay`` test, written out: bias, norm or gamma."""
    return name.endswith(".bias") or "norm" in name or "gamma" in name


def test_each_backbone_reports_dinov2_depths_whatever_its_chunks_and_prefix() -> None:
    """DINOv2's depth of a parameter (0 embeddings and tokens, i + 1 block i, n + 1 the rest)
    is n + 1 - the decay steps the backbone reports, chunked or not."""
    shape = {"img_size": 16, "patch_size": 8, "in_chans": 3, "depth": 4, "init_values": 1e-5}
    plain = build_vit("vit_small", **shape, num_register_tokens=1)
    chunked = build_vit("vit_small", **shape, num_register_tokens=1, block_chunks=2)
    steps = plain.layerwise_lr_steps()
    assert set(steps) == {name for name, _ in plain.named_parameters()}
    depth = {name: 5 - n for name, n in steps.items()}
    for token in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
        assert depth[token] == 0
    assert depth["patch_embed.proj.weight"] == depth["patch_embed.proj.bias"] == 0
    assert depth["blocks.0.attn.qkv.weight"] == 1 and depth["blocks.0.ls1.gamma"] == 1
    assert depth["blocks.3.mlp.fc2.bias"] == 4 and depth["norm.weight"] == 5
    # Chunk 1 holds blocks 2 and 3 behind two Identity pads: the same depths by block index.
    chunked_steps = chunked.layerwise_lr_steps()
    assert chunked_steps["blocks.1.3.mlp.fc2.bias"] == steps["blocks.3.mlp.fc2.bias"]
    assert sorted(chunked_steps.values()) == sorted(steps.values())
    wrapped = torch.nn.ModuleDict({"student": torch.nn.ModuleDict({"backbone": plain})})
    assert layerwise_lr_steps(wrapped)["student.backbone.blocks.2.norm1.weight"] == 2


def test_vit_names_exactly_dinov2_exemptions() -> None:
    vit = build_vit(
        "vit_small",
        img_size=16,
        patch_size=8,
        in_chans=2,
        embed_dim=8,
        depth=1,
        num_heads=2,
        init_values=1e-5,
        num_register_tokens=1,
    )
    block = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.bias",
        "attn.proj.bias",
        "ls1.gamma",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.bias",
        "mlp.fc2.bias",
        "ls2.gamma",
    ]
    expected = {"patch_embed.proj.bias", "norm.weight", "norm.bias"}
    expected |= {f"blocks.0.{name}" for name in block}
    assert vit.no_weight_decay() == expected
    decaying = {name for name, _ in vit.named_parameters()} - expected
    assert decaying == {
        "cls_token",
        "pos_embed",
        "mask_token",
        "register_tokens",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
    }


@pytest.mark.parametrize("student_name", list(STUDENTS))
def test_real_student_weight_decay_is_dinov2s(student_name: str) -> None:
    student = _student(STUDENTS[student_name]())
    names = [name for name, _ in student.named_parameters()]
    by_name = _by_name(_groups(student))
    assert set(by_name) == set(names)
    for name in names:
        assert by_name[name]["wd_multiplier"] == (0.0 if _dinov2_exempt(name) else 1.0), name
    # The points where rsdino used to differ: learned tokens decay, LayerScale gains do not.
    tokens = [n for n in names if n.rsplit(".", 1)[-1].endswith(("_token", "_tokens", "_embed"))]
    tokens += [n for n in names if ".missing_tokens." in n]
    assert tokens and all(by_name[n]["wd_multiplier"] == 1.0 for n in tokens)
    gammas = [n for n in names if n.endswith(".gamma")]
    assert gammas and all(by_name[n]["wd_multiplier"] == 0.0 for n in gammas)


def test_exemptions_come_from_the_model_not_the_names() -> None:
    student = _student(STUDENTS["unimodal"]())
    reported = no_weight_decay_names(student)
    assert "encoder.backbones.s2.blocks.0.ls1.gamma" in reported
    assert "encoder.backbones.s2.cls_token" not in reported
    # A part that reports nothing leaves its parameters decaying, whatever they are called.
    student["dino_head"].no_weight_decay = set
    assert "dino_head.mlp.0.bias" not in no_weight_decay_names(student)
    assert _by_name(_groups(student))["dino_head.mlp.0.bias"]["wd_multiplier"] == 1.0


def test_lr_multipliers_and_last_layer_on_the_real_student() -> None:
    student = _student(STUDENTS["multimodal_linear"]())
    by_name = _by_name(_groups(student))  # 2 blocks, decay 0.5: depth d gets 0.5 ** (3 - d)
    expected_lr = {
        "encoder.backbones.s1.cls_token": 0.125,
        "encoder.backbones.s2.pos_embed": 0.125,
        "encoder.backbones.s2.mask_token": 0.125,
        "encoder.backbones.s2.patch_embed.proj.weight": 0.125 * 0.2,
        "encoder.backbones.s1.patch_embed.proj.bias": 0.125 * 0.2,
        "encoder.backbones.s2.blocks.0.attn.qkv.weight": 0.25,
        "encoder.backbones.s2.blocks.0.ls1.gamma": 0.25,
        "encoder.backbones.s1.blocks.1.norm2.weight": 0.5,
        "encoder.backbones.s2.norm.weight": 1.0,
        "encoder.fusion.proj.weight": 1.0,
        "encoder.missing_tokens.s1": 1.0,
        "dino_head.mlp.0.weight": 1.0,
        "dino_head.last_layer.weight_g": 1.0,
    }
    for name, lr_multiplier in expected_lr.items():
        assert by_name[name]["lr_multiplier"] == pytest.approx(lr_multiplier), name
    last_layer = {name for name, group in by_name.items() if group["is_last_layer"]}
    assert last_layer == {"dino_head.last_layer.weight_g", "dino_head.last_layer.weight_v"}
    # The gain decays like the prototypes, as in DINOv2 (its name has no bias, norm or gamma).
    assert by_name["dino_head.last_layer.weight_g"]["wd_multiplier"] == 1.0


def test_param_groups_fuse_equal_settings_and_skip_frozen() -> None:
    student = _student(STUDENTS["unimodal"]())
    encoder = student["encoder"].backbones["s2"]
    encoder.pos_embed.requires_grad_(False)
    groups = _groups(student)
    all_names = [name for group in groups for name in group["names"]]
    assert "encoder.backbones.s2.pos_embed" not in all_names
    assert len(all_names) == len(set(all_names)) == len(list(student.parameters())) - 1
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    # Block 0: 4 weight matrices decay; 4 biases, 4 norm parameters and 2 gains do not.
    block0 = [g for g in groups if g["lr_multiplier"] == 0.25]
    assert sorted(len(g["params"]) for g in block0) == [4, 10]
    assert all(len(g["params"]) == len(g["names"]) for g in groups)


def test_apply_optim_schedule_sets_lr_and_wd_per_group() -> None:
    student = _student(STUDENTS["unimodal"]())
    optimizer = torch.optim.AdamW(_groups(student))
    apply_optim_schedule(optimizer, lr=0.1, wd=0.05, last_layer_lr=0.0)
    by_name = _by_name(optimizer.param_groups)
    prefix = "encoder.backbones.s2."
    assert by_name[prefix + "blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(0.025)
    assert by_name[prefix + "blocks.0.attn.qkv.weight"]["weight_decay"] == pytest.approx(0.05)
    assert by_name[prefix + "patch_embed.proj.weight"]["lr"] == pytest.approx(0.0025)
    assert by_name[prefix + "cls_token"]["weight_decay"] == pytest.approx(0.05)
    assert by_name[prefix + "norm.weight"]["weight_decay"] == 0.0
    assert by_name["dino_head.mlp.0.weight"]["lr"] == pytest.approx(0.1)
    for name in ("dino_head.last_layer.weight_g", "dino_head.last_layer.weight_v"):
        assert by_name[name]["lr"] == 0.0
        assert by_name[name]["weight_decay"] == pytest.approx(0.05)
