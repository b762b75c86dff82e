"""Tests for the linear and cross-attention fusion of two token streams."""

from __future__ import annotations

import pytest
import torch

from rsdino.models.fusion import CrossAttention, CrossAttentionFusion, LinearFusion

DIMS = {"s1": 8, "s2": 16}


def streams(
    batch: int = 2, tokens: int = 5, requires_grad: bool = False
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(batch, tokens, dim, generator=generator, requires_grad=requires_grad)
        for name, dim in DIMS.items()
    }


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_both_modes_give_the_same_shape() -> None:
    linear = LinearFusion(DIMS, out_dim=12)
    xattn = CrossAttentionFusion(DIMS, out_dim=12, nhead=3, nlayer=2).eval()
    assert linear(streams()).shape == (2, 5, 12)
    assert xattn(streams()).shape == (2, 5, 12)


def test_linear_fusion_concatenates_in_sorted_order() -> None:
    fusion = LinearFusion({"s2": 1, "s1": 1}, out_dim=2)
    with torch.no_grad():
        fusion.proj.weight.copy_(torch.eye(2))
        fusion.proj.bias.zero_()
    out = fusion({"s2": torch.ones(1, 3, 1), "s1": torch.zeros(1, 3, 1)})
    # LayerNorm of (0, 1): mean 0.5, std 0.5 -> (-1, 1) up to eps.
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0]).expand(1, 3, 2), atol=1e-5, rtol=0)


def cross_attention_params(dims: dict[str, int], out_dim: int, nlayer: int) -> int:
    """Parameter count written out layer by layer."""
    d = out_dim
    input_proj = sum(dim * d + d for dim in dims.values() if dim != d)
    layer_norm = 2 * d
    q = d * d + d
    kv = d * 2 * d + 2 * d
    proj = d * d + d
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    one_direction = 3 * layer_norm + q + kv + proj + mlp
    final_fusion = (2 * d * d + d) + layer_norm
    return input_proj + nlayer * 2 * one_direction + final_fusion


@pytest.mark.parametrize("nlayer", [0, 1, 3])
def test_cross_attention_parameter_count(nlayer: int) -> None:
    fusion = CrossAttentionFusion(DIMS, out_dim=16, nhead=4, nlayer=nlayer)
    assert isinstance(fusion.input_proj["s2"], torch.nn.Identity)
    assert n_params(fusion) == cross_attention_params(DIMS, 16, nlayer)
    # Spot value for nlayer=1: 144 + 2 * (96 + 272 + 544 + 272 + 2128) + 528 + 32 = 7328.
    if nlayer == 1:
        assert n_params(fusion) == 7328


def test_zero_layers_is_projection_then_linear_fusion() -> None:
    fusion = CrossAttentionFusion(DIMS, out_dim=16, nhead=4, nlayer=0)
    tokens = streams()
    projected = tokens["s1"] @ fusion.input_proj["s1"].weight.T + fusion.input_proj["s1"].bias
    concatenated = torch.cat((projected, tokens["s2"]), dim=-1)
    pre_norm = concatenated @ fusion.fuse.proj.weight.T + fusion.fuse.proj.bias
    expected = torch.nn.functional.layer_norm(pre_norm, (16,), eps=1e-6)
    torch.testing.assert_close(fusion(tokens), expected)


def test_layers_update_both_streams_from_the_layer_inputs() -> None:
    fusion = CrossAttentionFusion({"s1": 8, "s2": 8}, out_dim=8, nhead=2, nlayer=1).eval()
    tokens = streams()
    tokens["s2"] = tokens["s2"][..., :8]
    layer = fusion.layers[0]
    s1_new = layer["s1"](tokens["s1"], tokens["s2"])
    s2_new = layer["s2"](tokens["s2"], tokens["s1"])  # reads the old s1, not s1_new
    expected = fusion.fuse({"s1": s1_new, "s2": s2_new})
    torch.testing.assert_close(fusion(tokens), expected)


def test_cross_attention_over_one_context_token_is_its_value() -> None:
    attention = CrossAttention(dim=4, num_heads=1)
    x = torch.randn(2, 3, 4)
    context = torch.randn(2, 1, 4)
    # One key: softmax weight 1, so every query gets proj(value(context)).
    value = context @ attention.kv.weight[4:].T + attention.kv.bias[4:]
    expected = (value @ attention.proj.weight.T + attention.proj.bias).expand(2, 3, 4)
    torch.testing.assert_close(attention(x, context), expected)


def test_dropout_only_in_training() -> None:
    fusion = CrossAttentionFusion(DIMS, out_dim=16, nhead=4, nlayer=1, dropout=0.5)
    tokens = streams()
    fusion.eval()
    evaluated = fusion(tokens)
    torch.testing.assert_close(fusion(tokens), evaluated)
    fusion.train()
    torch.manual_seed(0)
    assert not torch.allclose(fusion(tokens), evaluated)


@pytest.mark.parametrize(
    "fusion",
    [LinearFusion(DIMS, out_dim=16), CrossAttentionFusion(DIMS, out_dim=16, nhead=4, nlayer=1)],
    ids=["linear", "xattn"],
)
def test_gradient_reaches_both_streams(fusion: torch.nn.Module) -> None:
    tokens = streams(requires_grad=True)
    fusion(tokens).square().sum().backward()
    for name in DIMS:
        assert tokens[name].grad is not None
        assert tokens[name].grad.abs().sum() > 0


def test_errors() -> None:
    with pytest.raises(ValueError, match="exactly two"):
        CrossAttentionFusion({"a": 4, "b": 4, "c": 4}, out_dim=4, nhead=1, nlayer=1)
    with pytest.raises(ValueError, match="exactly two"):
        CrossAttentionFusion({"a": 4}, out_dim=4, nhead=1, nlayer=1)
    with pytest.raises(ValueError, match="at least two"):
        LinearFusion({"a": 4}, out_dim=4)
    with pytest.raises(ValueError, match="nhead"):
        CrossAttentionFusion(DIMS, out_dim=16, nhead=3, nlayer=1)
    fusion = LinearFusion(DIMS, out_dim=16)
    with pytest.raises(ValueError, match="modalities"):
        fusion({"s1": torch.zeros(1, 2, 8)})
    with pytest.raises(ValueError, match=r"\[B, T, 16\]"):
        fusion({"s1": torch.zeros(1, 2, 8), "s2": torch.zeros(1, 2, 8)})
    with pytest.raises(ValueError, match="token count"):
        fusion({"s1": torch.zeros(1, 2, 8), "s2": torch.zeros(1, 3, 16)})
