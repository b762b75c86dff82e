"""Tests for the ViT backbone, the DINO head and DINOv2 checkpoint loading."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rsdino.models.heads import DINOHead
from rsdino.models.layers import Attention, DropPath, SwiGLUFFN
from rsdino.models.pretrained import adapt_patch_embed_weight, load_pretrained_backbone
from rsdino.models.vit import VisionTransformer, build_vit, resample_patch_pos_embed


def tiny_vit(**overrides: Any) -> VisionTransformer:
    """A 2-block, 32-wide ViT on 32x32 images with 8x8 patches (a 4x4 grid)."""
    options: dict[str, Any] = {
        "img_size": 32,
        "patch_size": 8,
        "in_chans": 3,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "init_values": 1e-1,
    }
    options.update(overrides)
    return build_vit("vit_small", **options).eval()


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def official_vits14_reg4_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the official dinov2_vits14_reg4 checkpoint, written out by hand."""
    dim = 384
    expected = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + 37 * 37, dim),
        "register_tokens": (1, 4, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(12):
        expected.update(
            {
                f"blocks.{i}.norm1.weight": (dim,),
                f"blocks.{i}.norm1.bias": (dim,),
                f"blocks.{i}.attn.qkv.weight": (3 * dim, dim),
                f"blocks.{i}.attn.qkv.bias": (3 * dim,),
                f"blocks.{i}.attn.proj.weight": (dim, dim),
                f"blocks.{i}.attn.proj.bias": (dim,),
                f"blocks.{i}.ls1.gamma": (dim,),
                f"blocks.{i}.norm2.weight": (dim,),
                f"blocks.{i}.norm2.bias": (dim,),
                f"blocks.{i}.mlp.fc1.weight": (4 * dim, dim),
                f"blocks.{i}.mlp.fc1.bias": (4 * dim,),
                f"blocks.{i}.mlp.fc2.weight": (dim, 4 * dim),
                f"blocks.{i}.mlp.fc2.bias": (dim,),
                f"blocks.{i}.ls2.gamma": (dim,),
            }
        )
    return expected


@pytest.mark.parametrize("block_chunks", [0, 1])
def test_vits14_reg4_has_official_keys_and_shapes(block_chunks: int) -> None:
    model = build_vit(
        "vit_small",
        img_size=518,
        patch_size=14,
        in_chans=3,
        init_values=1e-5,
        num_register_tokens=4,
        block_chunks=block_chunks,
    )
    assert shapes(model) == official_vits14_reg4_shapes()
    assert (model.embed_dim, model.num_features, model.n_blocks) == (384, 384, 12)
    assert not model.chunked_blocks
    assert isinstance(model.head, torch.nn.Identity)


def test_init_values_mask_token_and_layerscale() -> None:
    model = tiny_vit(init_values=0.25)
    assert torch.equal(model.mask_token, torch.zeros(1, 32))
    assert torch.equal(model.blocks[1].ls2.gamma, torch.full((32,), 0.25))
    assert model.cls_token.abs().max() < 1e-4  # normal with std 1e-6
    for off in (None, 0, 0.0):  # DINOv2 configs write layerscale: 0 for "no LayerScale"
        no_layerscale = tiny_vit(init_values=off)
        assert isinstance(no_layerscale.blocks[0].ls1, torch.nn.Identity)
        assert isinstance(no_layerscale.blocks[1].ls2, torch.nn.Identity)
        assert not any("gamma" in key for key in no_layerscale.state_dict())


def test_layerscale_zero_loads_a_checkpoint_without_gammas_and_keeps_the_branches() -> None:
    torch.manual_seed(0)
    plain = tiny_vit(init_values=None)
    zero = tiny_vit(init_values=0)
    load_pretrained_backbone(zero, plain.state_dict())  # strict: no ls1/ls2 keys expected
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(zero(x), plain(x), rtol=0, atol=0)
    # A zero gain would have silenced both residual branches: every block an identity map.
    tokens = zero.prepare_tokens(x)
    assert not torch.allclose(zero.blocks[0](tokens), tokens)


@pytest.mark.parametrize("ffn_layer", ["swiglufused", "swiglu"])
def test_giant_swiglu_hidden_size_is_4096(ffn_layer: str) -> None:
    model = build_vit(
        "vit_giant2", img_size=28, patch_size=14, in_chans=3, depth=1, ffn_layer=ffn_layer
    )
    model_shapes = shapes(model)
    assert model_shapes["blocks.0.mlp.w12.weight"] == (8192, 1536)
    assert model_shapes["blocks.0.mlp.w3.weight"] == (1536, 4096)


def test_swiglu_maths() -> None:
    ffn = SwiGLUFFN(2, 12)  # 12 * 2/3 = 8, already a multiple of 8
    assert ffn.w3.in_features == 8
    x = torch.randn(5, 2)
    hidden = x @ ffn.w12.weight.T + ffn.w12.bias
    gate, value = hidden[:, :8], hidden[:, 8:]
    expected = (gate / (1 + torch.exp(-gate)) * value) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), expected)


def test_attention_matches_hand_softmax() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=4, num_heads=2)
    x = torch.randn(2, 3, 4)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(4, dim=-1)
    heads = []
    for h in range(2):
        cols = slice(2 * h, 2 * h + 2)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(2), dim=-1)
        heads.append(weights @ v[..., cols])
    expected = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected)


def test_drop_path_drops_whole_samples_and_rescales() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.5)
    x = torch.ones(400, 3)
    out = drop(x)
    rows = {tuple(row.tolist()) for row in out}
    assert rows == {(0.0, 0.0, 0.0), (2.0, 2.0, 2.0)}
    drop.eval()
    assert torch.equal(drop(x), x)


def test_drop_path_schedule() -> None:
    linear = tiny_vit(depth=3, drop_path_rate=0.2)
    assert isinstance(linear.blocks[0].drop_path, torch.nn.Identity)
    rates = [linear.blocks[i].drop_path.drop_prob for i in (1, 2)]
    assert rates == pytest.approx([0.1, 0.2])
    uniform = tiny_vit(depth=3, drop_path_rate=0.2, drop_path_uniform=True)
    assert [b.drop_path.drop_prob for b in uniform.blocks] == pytest.approx([0.2] * 3)


def test_chunked_keys_use_global_block_index() -> None:
    model = tiny_vit(depth=8, block_chunks=4)
    keys = set(model.state_dict())
    assert model.chunked_blocks
    assert len(model.blocks) == 4
    for chunk, block in [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (3, 7)]:
        assert f"blocks.{chunk}.{block}.attn.qkv.weight" in keys
    assert not any(key.startswith("blocks.1.0.") for key in keys)
    assert sum(key.endswith("norm1.weight") for key in keys) == 8


def test_chunked_and_flat_state_dicts_load_into_each_other() -> None:
    torch.manual_seed(0)
    chunked = tiny_vit(depth=8, block_chunks=4)
    flat = tiny_vit(depth=8, block_chunks=0)
    x = torch.randn(2, 3, 32, 32)
    load_pretrained_backbone(flat, chunked.state_dict())
    torch.testing.assert_close(flat(x), chunked(x), rtol=0, atol=0)

    torch.manual_seed(1)
    source = tiny_vit(depth=8)
    load_pretrained_backbone(chunked, source.state_dict())
    torch.testing.assert_close(chunked(x), source(x), rtol=0, atol=0)
    chunked_layers = chunked.get_intermediate_layers(x, n=[1, 6])
    flat_layers = source.get_intermediate_layers(x, n=[1, 6])
    for a, b in zip(chunked_layers, flat_layers, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_file_round_trip_and_wrapped_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = tiny_vit(num_register_tokens=2)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    fresh = tiny_vit(num_register_tokens=2)
    load_pretrained_backbone(fresh, path)
    torch.testing.assert_close(fresh(x), source(x), rtol=0, atol=0)

    state = source.state_dict()
    training_checkpoint = {
        "model": {
            **{f"teacher.backbone.{k}": v for k, v in state.items()},
            **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in state.items()},
            "teacher.dino_head.last_layer.weight": torch.zeros(3, 3),
        },
        "iteration": 7,
    }
    teacher_checkpoint = {"teacher": {f"backbone.{k}": v for k, v in state.items()}}
    ddp_checkpoint = {f"module.{k}": v for k, v in state.items()}
    for checkpoint in (training_checkpoint, teacher_checkpoint, ddp_checkpoint):
        fresh = tiny_vit(num_register_tokens=2)
        load_pretrained_backbone(fresh, checkpoint)
        torch.testing.assert_close(fresh(x), source(x), rtol=0, atol=0)


def test_mismatched_checkpoint_is_rejected_without_loading() -> None:
    source = tiny_vit(num_register_tokens=2)
    target = tiny_vit()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"given state dict.*unexpected: \['register_tokens'\]"):
        load_pretrained_backbone(target, source.state_dict())
    state = tiny_vit().state_dict()
    del state["norm.bias"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"missing: \['norm.bias'\].*shape"):
        load_pretrained_backbone(target, state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])


def test_mean_band_adaptation_keeps_grey_response() -> None:
    torch.manual_seed(0)
    rgb = tiny_vit()
    bands13 = tiny_vit(in_chans=13)
    load_pretrained_backbone(bands13, rgb.state_dict(), patch_embed_adapt="mean")
    rgb_weight = rgb.patch_embed.proj.weight
    expected_filter = (rgb_weight[:, 0] + rgb_weight[:, 1] + rgb_weight[:, 2]) / 3 * (3 / 13)
    for band in range(13):
        torch.testing.assert_close(bands13.patch_embed.proj.weight[:, band], expected_filter)

    grey = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(
        bands13.patch_embed(grey.expand(-1, 13, -1, -1)),
        rgb.patch_embed(grey.expand(-1, 3, -1, -1)),
    )


def test_rgb_band_adaptation_places_filters() -> None:
    torch.manual_seed(0)
    rgb = tiny_vit()
    bands13 = tiny_vit(in_chans=13)
    load_pretrained_backbone(
        bands13, rgb.state_dict(), patch_embed_adapt="rgb", rgb_band_indices=(3, 2, 1)
    )
    source = rgb.patch_embed.proj.weight
    adapted = bands13.patch_embed.proj.weight
    scale = 3 / 13
    torch.testing.assert_close(adapted[:, 3], source[:, 0] * scale)
    torch.testing.assert_close(adapted[:, 2], source[:, 1] * scale)
    torch.testing.assert_close(adapted[:, 1], source[:, 2] * scale)
    mean_filter = source.mean(dim=1) * scale
    for band in [0, *range(4, 13)]:
        torch.testing.assert_close(adapted[:, band], mean_filter)
    torch.testing.assert_close(bands13.patch_embed.proj.bias, rgb.patch_embed.proj.bias)


def test_same_band_count_is_not_adapted() -> None:
    weight = torch.randn(4, 3, 2, 2)
    assert adapt_patch_embed_weight(weight, 3, "rgb", (0, 1, 2)) is weight


def test_bad_adapt_arguments() -> None:
    rgb = tiny_vit()
    bands13 = tiny_vit(in_chans=13)
    with pytest.raises(ValueError, match="patch_embed_adapt"):
        load_pretrained_backbone(bands13, rgb.state_dict(), patch_embed_adapt="zeros")
    with pytest.raises(ValueError, match="rgb_band_indices"):
        load_pretrained_backbone(bands13, rgb.state_dict(), patch_embed_adapt="rgb")
    with pytest.raises(ValueError, match="rgb_band_indices"):
        load_pretrained_backbone(
            bands13, rgb.state_dict(), patch_embed_adapt="rgb", rgb_band_indices=(3, 3, 13)
        )


def test_pos_embed_interpolation_for_other_input_sizes() -> None:
    model = tiny_vit(img_size=64, num_register_tokens=1)
    assert model.pos_embed.shape == (1, 1 + 64, 32)
    for size in (32, 48):
        features = model.forward_features(torch.randn(2, 3, size, size))
        grid = (size // 8) ** 2
        assert features["x_norm_patchtokens"].shape == (2, grid, 32)
        assert features["x_prenorm"].shape == (2, 1 + 1 + grid, 32)
    tokens = torch.zeros(1, 65, 32)
    assert model.interpolate_pos_encoding(tokens, 64, 64) is model.pos_embed
    resized = model.interpolate_pos_encoding(tokens, 40, 24)
    assert resized.shape == (1, 1 + 5 * 3, 32)
    torch.testing.assert_close(resized[:, 0], model.pos_embed[:, 0])


def test_resampling_keeps_a_constant_grid_constant() -> None:
    constant = torch.full((1, 16, 3), 0.7)  # bicubic weights sum to one
    for offset in (0.0, 0.1):
        out = resample_patch_pos_embed(constant, (2, 6), offset=offset)
        assert out.shape == (1, 12, 3)
        torch.testing.assert_close(out, torch.full((1, 12, 3), 0.7))


def test_checkpoint_pos_embed_is_resampled_to_model_grid() -> None:
    source = tiny_vit(img_size=64)
    with torch.no_grad():
        source.pos_embed[:, 0] = 5.0
        source.pos_embed[:, 1:] = 0.5
    target = tiny_vit(img_size=32)
    load_pretrained_backbone(target, source.state_dict())
    expected = torch.cat((torch.full((1, 1, 32), 5.0), torch.full((1, 16, 32), 0.5)), dim=1)
    torch.testing.assert_close(target.pos_embed.detach(), expected)


def test_masks_replace_exactly_the_masked_patch_tokens() -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5]] = True
    masks[1, 15] = True
    tokens = model.prepare_tokens(x, masks)

    # Patch embedding by hand: unfold 8x8 patches in row-major order, then a matrix product.
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, -1)
    weight = model.patch_embed.proj.weight.reshape(32, -1)
    embedded = patches @ weight.T + model.patch_embed.proj.bias
    embedded[masks] = model.mask_token[0]
    expected = torch.cat((model.cls_token.expand(2, -1, -1), embedded), dim=1) + model.pos_embed
    torch.testing.assert_close(tokens, expected)


def test_registers_and_forward_features_shapes() -> None:
    model = tiny_vit(num_register_tokens=4)
    x = torch.randn(3, 3, 32, 32)
    tokens = model.prepare_tokens(x)
    assert tokens.shape == (3, 1 + 4 + 16, 32)
    # Registers sit right after cls and carry no position embedding.
    torch.testing.assert_close(tokens[:, 1:5], model.register_tokens.expand(3, -1, -1))

    masks = torch.zeros(3, 16, dtype=torch.bool)
    features = model(x, masks=masks, is_training=True)
    assert features["x_norm_clstoken"].shape == (3, 32)
    assert features["x_norm_regtokens"].shape == (3, 4, 32)
    assert features["x_norm_patchtokens"].shape == (3, 16, 32)
    assert features["x_prenorm"].shape == (3, 21, 32)
    assert features["masks"] is masks
    normed = F.layer_norm(features["x_prenorm"], (32,), model.norm.weight, model.norm.bias, 1e-6)
    torch.testing.assert_close(features["x_norm_regtokens"], normed[:, 1:5])
    torch.testing.assert_close(model(x), normed[:, 0])


def test_get_intermediate_layers() -> None:
    model = tiny_vit(depth=3, num_register_tokens=2)
    x = torch.randn(2, 3, 32, 40)
    last = model.get_intermediate_layers(x, n=1)
    assert len(last) == 1
    torch.testing.assert_close(last[0], model.forward_features(x)["x_norm_patchtokens"])
    maps = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(maps) == 2
    for patch_map, cls in maps:
        assert patch_map.shape == (2, 32, 4, 5)
        assert cls.shape == (2, 32)
    with pytest.raises(ValueError, match="outside"):
        model.get_intermediate_layers(x, n=[3])


def test_dino_head_gives_cosine_logits_times_the_gain() -> None:
    head = DINOHead(in_dim=2, out_dim=3, nlayers=1, bottleneck_dim=2)
    assert torch.equal(head.last_layer.weight_g, torch.ones(3, 1))  # DINOv2 starts the gain at 1
    with torch.no_grad():
        head.mlp.weight.copy_(torch.eye(2))
        head.mlp.bias.zero_()
        head.last_layer.weight_v.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 1.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, -5.0]])
    # Input rows normalise to (1, 0) and (0, -1); prototypes to (.6, .8), (0, 1), (1, 1)/sqrt 2.
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(head(x), torch.tensor([[0.6, 0.0, r], [-0.8, -1.0, -r]]))
    with torch.no_grad():
        head.last_layer.weight_g.copy_(torch.tensor([[2.0], [0.5], [-1.0]]))
    torch.testing.assert_close(head(x), torch.tensor([[1.2, 0.0, -r], [-1.6, -0.5, r]]))


def test_dino_head_structure_and_output_dim() -> None:
    head = DINOHead(in_dim=8, out_dim=50, use_bn=True, nlayers=3, hidden_dim=16, bottleneck_dim=4)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert head(torch.randn(5, 8)).shape == (5, 50)
    assert shapes(head.last_layer) == {"weight_g": (50, 1), "weight_v": (50, 4)}
    assert set(head.state_dict()) >= {"mlp.0.weight", "mlp.6.bias", "mlp.1.running_mean"}


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="vit_small"):
        build_vit("vit_huge", img_size=32, patch_size=8, in_chans=3)
    with pytest.raises(ValueError, match="swiglufused"):
        tiny_vit(ffn_layer="geglu")
    model = tiny_vit()
    with pytest.raises(ValueError, match="divisible by the patch size 8"):
        model(torch.randn(1, 3, 30, 32))
