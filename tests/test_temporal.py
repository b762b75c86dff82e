"""Tests for the day-of-year embedding."""

from __future__ import annotations

import math

import pytest
import torch

from rsdino.models.temporal import TemporalEmbedding


def with_ones_projection(embedding: TemporalEmbedding) -> TemporalEmbedding:
    """Every output channel = sum of the features + 1, so values are easy to compute by hand."""
    with torch.no_grad():
        embedding.proj.weight.fill_(1.0)
        embedding.proj.bias.fill_(1.0)
    return embedding


def test_features_by_hand() -> None:
    embedding = TemporalEmbedding(embed_dim=4, n_harmonics=4)
    quarter_year = 1.0 + 365.25 / 4  # t = 0.25: angles 2πk/4 = π/2, π, 3π/2, 2π
    features = embedding.features(torch.tensor([1.0, quarter_year]))
    expected = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
            [1.0, 0.0, -1.0, 0.0, 0.0, -1.0, 0.0, 1.0],
        ]
    )
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=0.0)


def test_year_feature_appended() -> None:
    embedding = TemporalEmbedding(embed_dim=4, n_harmonics=1, use_year=True)
    features = embedding.features(torch.tensor([1, 1]), torch.tensor([2025, 2010]))
    torch.testing.assert_close(features, torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, -0.5]]))


def test_year_end_is_next_to_year_start() -> None:
    embedding = TemporalEmbedding(embed_dim=4)
    features = embedding.features(torch.tensor([365, 1, 183]))
    assert (features[0] - features[1]).norm() < (features[0] - features[2]).norm()
    with_ones_projection(embedding)
    out = embedding(torch.tensor([365, 1, 183]))
    # With all-ones weights the output only sees the sum of features; still cyclic.
    assert (out[0] - out[1]).abs().max() < (out[0] - out[2]).abs().max()


def test_zero_at_init() -> None:
    embedding = TemporalEmbedding(embed_dim=6, use_year=True)
    out = embedding(torch.tensor([1, 100, 366]), torch.tensor([2017, 2019, 2021]))
    assert out.shape == (3, 6)
    assert torch.equal(out, torch.zeros(3, 6))


def test_undated_rows_are_exactly_zero() -> None:
    embedding = with_ones_projection(TemporalEmbedding(embed_dim=3, n_harmonics=1))
    out = embedding(torch.tensor([0, -1, 1]))
    assert torch.equal(out[:2], torch.zeros(2, 3))
    # doy 1: sin(0) + cos(0) + bias = 0 + 1 + 1.
    torch.testing.assert_close(out[2], torch.full((3,), 2.0))


def test_int_and_float_doy_agree() -> None:
    embedding = with_ones_projection(TemporalEmbedding(embed_dim=2, n_harmonics=2))
    from_int = embedding(torch.tensor([10, 200]))
    from_float = embedding(torch.tensor([10.0, 200.0]))
    torch.testing.assert_close(from_int, from_float)
    t = 199 / 365.25
    by_hand = sum(f(2 * math.pi * k * t) for k in (1, 2) for f in (math.sin, math.cos)) + 1.0
    torch.testing.assert_close(from_int[1], torch.full((2,), by_hand))


def test_dtype_and_device_follow_request_and_input() -> None:
    embedding = with_ones_projection(TemporalEmbedding(embed_dim=4))
    doy = torch.tensor([5, 0])
    default = embedding(doy)
    assert default.dtype == torch.float32
    assert default.device == doy.device
    bf16 = embedding(doy, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.device == doy.device
    assert torch.equal(bf16[1], torch.zeros(4, dtype=torch.bfloat16))
    assert embedding.double()(doy).dtype == torch.float64


def test_errors() -> None:
    embedding = TemporalEmbedding(embed_dim=4)
    with pytest.raises(ValueError, match="shape"):
        embedding(torch.tensor([[12]]))
    with pytest.raises(ValueError, match="year"):
        TemporalEmbedding(embed_dim=4, use_year=True)(torch.tensor([12]))
    with pytest.raises(ValueError, match="n_harmonics"):
        TemporalEmbedding(embed_dim=4, n_harmonics=0)
