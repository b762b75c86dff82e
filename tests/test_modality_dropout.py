"""Modality dropout keeps at least one modality per row and drops at the requested rate."""

from __future__ import annotations

import pytest
import torch

from rsdino.data.modality_dropout import sample_modality_presence


def test_every_row_keeps_a_modality_and_rate_matches() -> None:
    generator = torch.Generator().manual_seed(0)
    present = sample_modality_presence(20000, ("s1", "s2"), 0.3, generator)
    assert present is not None
    both = present["s1"] & present["s2"]
    assert bool((present["s1"] | present["s2"]).all())
    assert abs((~both).float().mean().item() - 0.3) < 0.015
    # The kept modality is chosen uniformly among the dropped rows.
    only_s1 = present["s1"] & ~present["s2"]
    assert abs(only_s1.float().sum().item() / (~both).sum().item() - 0.5) < 0.03


def test_nothing_to_drop_returns_none() -> None:
    generator = torch.Generator().manual_seed(0)
    assert sample_modality_presence(8, ("s2",), 0.5, generator) is None
    assert sample_modality_presence(8, ("s1", "s2"), 0.0, generator) is None


def test_bad_probability() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sample_modality_presence(8, ("s1", "s2"), 1.0, torch.Generator())
