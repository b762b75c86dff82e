"""Tests for the multimodal encoder: backbones, date bias, missing modalities and fusion."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rsdino.models.encoder import RemoteSensingEncoder, build_encoder
from rsdino.models.fusion import CrossAttentionFusion, LinearFusion
from rsdino.models.temporal import TemporalEmbedding
from rsdino.models.vit import VisionTransformer, build_vit

BATCH = 2
SIZE = 16  # 16x16 pixels, 8x8 patches: a 2x2 grid, N = 4
N_PATCHES = 4
REGISTERS = 1


def tiny_vit(in_chans: int, embed_dim: int, depth: int, **overrides: Any) -> VisionTransformer:
    options: dict[str, Any] = {
        "img_size": SIZE,
        "patch_size": 8,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": 2,
        "init_values": 0.1,
        "num_register_tokens": REGISTERS,
    }
    options.update(overrides)
    return build_vit("vit_small", **options).eval()


def two_backbones(**s1_overrides: Any) -> dict[str, VisionTransformer]:
    torch.manual_seed(0)
    return {
        "s1": tiny_vit(in_chans=2, embed_dim=8, depth=1, **s1_overrides),
        "s2": tiny_vit(in_chans=13, embed_dim=12, depth=2),
    }


def images(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "s1": torch.randn(BATCH, 2, SIZE, SIZE, generator=generator),
        "s2": torch.randn(BATCH, 13, SIZE, SIZE, generator=generator),
    }


def linear_encoder(**kwargs: Any) -> RemoteSensingEncoder:
    return build_encoder(backbones=two_backbones(), fuse_alg="linear", **kwargs).eval()


def clearly_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """More than rounding noise apart: an ignored bias still moves the last bits."""
    return bool((a - b).abs().max() > 1e-3)


def set_nonzero_temporal(encoder: RemoteSensingEncoder) -> None:
    """Random projections: the bias must differ across channels, since a bias equal on every
    channel is exactly what the LayerNorms remove."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for embedding in encoder.temporal.values():
            embedding.proj.weight.copy_(
                torch.randn(embedding.proj.weight.shape, generator=generator)
            )
            embedding.proj.bias.copy_(torch.randn(embedding.proj.bias.shape, generator=generator))


def test_token_bias_is_added_to_every_token_before_the_blocks() -> None:
    vit = tiny_vit(in_chans=2, embed_dim=8, depth=0)
    x = images()["s1"]
    bias = torch.arange(BATCH * 8, dtype=torch.float32).reshape(BATCH, 8)
    out = vit.forward_features(x, token_bias=bias)
    # With no blocks, the output is just the norm of the biased tokens (1 + R + N of them).
    tokens = vit.prepare_tokens(x) + bias[:, None, :]
    expected = torch.nn.functional.layer_norm(
        tokens, (8,), vit.norm.weight, vit.norm.bias, eps=1e-6
    )
    torch.testing.assert_close(out["x_norm_clstoken"], expected[:, 0])
    torch.testing.assert_close(out["x_norm_regtokens"], expected[:, 1 : 1 + REGISTERS])
    torch.testing.assert_close(out["x_norm_patchtokens"], expected[:, 1 + REGISTERS :])
    assert torch.equal(vit(x, is_training=True, token_bias=bias)["x_prenorm"], tokens)


def test_unimodal_equals_the_backbone() -> None:
    backbone = tiny_vit(in_chans=13, embed_dim=12, depth=2)
    encoder = RemoteSensingEncoder({"s2": backbone})
    x = images()["s2"]
    masks = torch.tensor([[True, False, False, True], [False] * 4])
    out = encoder({"s2": x}, masks=masks)
    expected = backbone.forward_features(x, masks)
    assert set(out) == set(expected)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(out[key], expected[key])
    assert (encoder.embed_dim, encoder.n_blocks, encoder.modalities) == (12, 2, ["s2"])
    assert encoder.missing_tokens is None


def test_attributes_of_a_multimodal_encoder() -> None:
    encoder = build_encoder(backbones=two_backbones(), fuse_alg="linear", fused_dim=10)
    assert encoder.modalities == ["s1", "s2"]
    assert encoder.embed_dim == 10
    assert encoder.n_blocks == 2
    assert encoder.patch_size == 8
    assert encoder.num_register_tokens == REGISTERS
    assert {name: tuple(p.shape) for name, p in encoder.missing_tokens.items()} == {
        "s1": (8,),
        "s2": (12,),
    }


@pytest.mark.parametrize("fuse_alg", ["linear", "xattn"])
def test_build_encoder_output_shapes(fuse_alg: str) -> None:
    encoder = build_encoder(
        backbones=two_backbones(), fuse_alg=fuse_alg, xattn_nhead=2, xattn_nlayer=2
    ).eval()
    expected_fusion = LinearFusion if fuse_alg == "linear" else CrossAttentionFusion
    assert isinstance(encoder.fusion, expected_fusion)
    assert encoder.embed_dim == 12  # the widest backbone
    out = encoder(images())
    assert out["x_norm_clstoken"].shape == (BATCH, 12)
    assert out["x_norm_regtokens"].shape == (BATCH, REGISTERS, 12)
    assert out["x_norm_patchtokens"].shape == (BATCH, N_PATCHES, 12)


def test_multimodal_output_is_the_fused_token_sequence() -> None:
    encoder = linear_encoder()
    x = images()
    sequences = {}
    for name in ("s1", "s2"):
        out = encoder.backbones[name].forward_features(x[name])
        sequences[name] = torch.cat(
            (out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]),
            dim=1,
        )
    concatenated = torch.cat((sequences["s1"], sequences["s2"]), dim=-1)
    fused = torch.nn.functional.layer_norm(
        concatenated @ encoder.fusion.proj.weight.T + encoder.fusion.proj.bias, (12,), eps=1e-6
    )
    out = encoder(x)
    torch.testing.assert_close(out["x_norm_clstoken"], fused[:, 0])
    torch.testing.assert_close(out["x_norm_patchtokens"], fused[:, 1 + REGISTERS :])


def test_masks_reach_every_backbone() -> None:
    encoder = linear_encoder()
    captured: dict[str, list[torch.Tensor]] = {"s1": [], "s2": []}
    for name, backbone in encoder.backbones.items():
        backbone.norm.register_forward_hook(
            lambda _module, _inputs, output, name=name: captured[name].append(output)
        )
    masks = torch.zeros(BATCH, N_PATCHES, dtype=torch.bool)
    masks[0, 2] = True
    encoder(images())
    encoder(images(), masks=masks)
    patch_2 = 1 + REGISTERS + 2
    for name in ("s1", "s2"):
        unmasked, masked = captured[name]
        assert clearly_differ(unmasked[0, patch_2], masked[0, patch_2])
        torch.testing.assert_close(unmasked[1], masked[1])  # row 1 had no mask


def test_absent_modality_uses_the_missing_token() -> None:
    encoder = linear_encoder()
    present = {"s1": torch.tensor([False, True]), "s2": torch.tensor([True, True])}
    x = images()
    changed = dict(x, s1=x["s1"].clone())
    changed["s1"][0] += 5.0
    before = encoder(x, present=present)
    after = encoder(changed, present=present)
    for key, value in before.items():
        torch.testing.assert_close(after[key][0], value[0])
    # Without ``present`` the same change does show, so the check above can fail.
    assert clearly_differ(encoder(changed)["x_norm_clstoken"][0], encoder(x)["x_norm_clstoken"][0])
    # The absent row is driven by the learned missing token.
    with torch.no_grad():
        encoder.missing_tokens["s1"].add_(1.0)
    moved = encoder(x, present=present)
    assert clearly_differ(moved["x_norm_clstoken"][0], before["x_norm_clstoken"][0])
    torch.testing.assert_close(moved["x_norm_clstoken"][1], before["x_norm_clstoken"][1])


def test_present_errors() -> None:
    encoder = linear_encoder()
    with pytest.raises(ValueError, match="bool"):
        encoder(images(), present={"s1": torch.tensor([1, 0])})
    with pytest.raises(ValueError, match="unknown"):
        encoder(images(), present={"s3": torch.tensor([True, True])})
    unimodal = RemoteSensingEncoder({"s2": tiny_vit(in_chans=13, embed_dim=12, depth=1)})
    x = {"s2": images()["s2"]}
    with pytest.raises(ValueError, match="unimodal"):
        unimodal(x, present={"s2": torch.tensor([True, False])})


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        RemoteSensingEncoder(two_backbones(patch_size=4), LinearFusion({"s1": 8, "s2": 12}, 12))
    with pytest.raises(ValueError, match="num_register_tokens"):
        RemoteSensingEncoder(
            two_backbones(num_register_tokens=0), LinearFusion({"s1": 8, "s2": 12}, 12)
        )
    with pytest.raises(ValueError, match="fusion"):
        RemoteSensingEncoder(two_backbones())
    with pytest.raises(ValueError, match="fusion"):
        RemoteSensingEncoder({"s2": tiny_vit(13, 12, 1)}, LinearFusion({"a": 1, "b": 1}, 2))
    with pytest.raises(ValueError, match="temporal"):
        RemoteSensingEncoder(
            two_backbones(),
            LinearFusion({"s1": 8, "s2": 12}, 12),
            temporal={"s1": TemporalEmbedding(8)},
        )
    with pytest.raises(ValueError, match=r"'linear', 'xattn'"):
        build_encoder(backbones=two_backbones(), fuse_alg="concat")
    with pytest.raises(ValueError, match="fuse_alg"):
        build_encoder(backbones=two_backbones(), fuse_alg=None)
    with pytest.raises(ValueError, match="two backbones"):
        build_encoder(backbones={"s2": tiny_vit(13, 12, 1)}, fuse_alg="linear")
    with pytest.raises(ValueError, match="temporal"):
        build_encoder(backbones=two_backbones(), fuse_alg="linear", temporal_use_year=True)


def test_images_must_be_co_registered() -> None:
    encoder = linear_encoder()
    x = images()
    with pytest.raises(ValueError, match="co-registered"):
        encoder({"s1": x["s1"][:, :, :8, :8], "s2": x["s2"]})
    with pytest.raises(ValueError, match="expected images"):
        encoder({"s2": x["s2"]})


def test_temporal_bias_is_a_no_op_at_init_then_changes_the_output() -> None:
    encoder = linear_encoder(temporal=True)
    x = images()
    doy = torch.tensor([30, 0])
    undated = encoder(x)
    torch.testing.assert_close(encoder(x, doy=doy), undated)
    set_nonzero_temporal(encoder)
    dated = encoder(x, doy=doy)
    assert clearly_differ(dated["x_norm_clstoken"][0], undated["x_norm_clstoken"][0])
    # doy 0 means "no date": that row keeps its undated output.
    torch.testing.assert_close(dated["x_norm_clstoken"][1], undated["x_norm_clstoken"][1])
    # No doy at all: an undated batch gets no bias.
    torch.testing.assert_close(encoder(x)["x_norm_clstoken"], undated["x_norm_clstoken"])


def test_unimodal_temporal_bias_is_the_backbone_token_bias() -> None:
    backbone = tiny_vit(in_chans=13, embed_dim=12, depth=1)
    encoder = build_encoder(backbones={"s2": backbone}, fuse_alg=None, temporal=True)
    set_nonzero_temporal(encoder)
    x = images()["s2"]
    doy = torch.tensor([1, 366])
    bias = encoder.temporal["s2"](doy)
    expected = backbone.forward_features(x, token_bias=bias)["x_norm_clstoken"]
    torch.testing.assert_close(encoder({"s2": x}, doy=doy)["x_norm_clstoken"], expected)


def test_year_reaches_the_embedding() -> None:
    encoder = linear_encoder(temporal=True, temporal_use_year=True)
    set_nonzero_temporal(encoder)
    x = images()
    doy = torch.tensor([30, 30])
    with pytest.raises(ValueError, match="year"):
        encoder(x, doy=doy)
    early = encoder(x, doy=doy, year=torch.tensor([2016, 2016]))
    late = encoder(x, doy=doy, year=torch.tensor([2024, 2024]))
    assert clearly_differ(early["x_norm_clstoken"], late["x_norm_clstoken"])
