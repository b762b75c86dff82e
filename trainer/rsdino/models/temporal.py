"""Acquisition-date embedding: where in the annual cycle (and which year) a scene was taken.

Vegetation, snow and water follow the seasons, so the same place looks different in January and in
July. The date enters the encoder as a bias added to every token (see ``VisionTransformer``'s
``token_bias``); its projection starts at zero so a pretrained backbone is undisturbed at first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DAYS_PER_YEAR = 365.25


class TemporalEmbedding(nn.Module):
    """Fixed Fourier features of the day of year, then a learned, zero-initialised projection.

    Day of year ``doy`` is 1-based (1 = 1 January). ``doy <= 0`` means "date unknown": such rows
    get an embedding of exactly zero, i.e. no bias at all. Values above 366 are not rejected
    here (checking would stall an accelerator every step): data sources validate dates.
    """

    def __init__(
        self,
        embed_dim: int,
        n_harmonics: int = 4,
        use_year: bool = False,
        year_origin: int = 2015,
        year_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if n_harmonics < 1:
            raise ValueError(f"n_harmonics must be at least 1, got {n_harmonics}")
        if year_scale <= 0:
            raise ValueError(f"year_scale must be positive, got {year_scale}")
        self.embed_dim = embed_dim
        self.n_harmonics = n_harmonics
        self.use_year = use_year
        self.year_origin = year_origin
        self.year_scale = year_scale
        self.n_features = 2 * n_harmonics + int(use_year)
        self.proj = nn.Linear(self.n_features, embed_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(self, doy: Tensor, year: Tensor | None = None) -> Tensor:
        """Fixed features [B, n_features] in float32 on ``doy``'s device.

        sin(2πkt) for k = 1..n_harmonics, then cos(2πkt), with t = (doy - 1) / 365.25 the
        fraction of the year elapsed: the features wrap around, so 31 December and 1 January are
        neighbours. With ``use_year``, (year - year_origin) / year_scale is appended.
        """
        if doy.ndim != 1:
            raise ValueError(f"doy must have shape [B], got {tuple(doy.shape)}")
        if self.use_year and year is None:
            raise ValueError(
                "this TemporalEmbedding uses the year (use_year=True) but year is None"
            )
        if self.use_year and year.shape != doy.shape:
            raise ValueError(f"year shape {tuple(year.shape)} differs from doy {tuple(doy.shape)}")
        fraction = (doy.float() - 1.0) / DAYS_PER_YEAR
        harmonics = torch.arange(1, self.n_harmonics + 1, device=doy.device, dtype=torch.float32)
        angles = 2.0 * math.pi * fraction.unsqueeze(1) * harmonics
        parts = [torch.sin(angles), torch.cos(angles)]
        if self.use_year:
            years = year.to(device=doy.device, dtype=torch.float32).unsqueeze(1)
            parts.append((years - self.year_origin) / self.year_scale)
        return torch.cat(parts, dim=1)

    def forward(
        self, doy: Tensor, year: Tensor | None = None, *, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Embedding [B, embed_dim] in ``dtype`` (default: the projection's dtype).

        The projection runs in float32 so that a bf16 model still sees a precise date.
        """
        features = self.features(doy, year)
        embedding = F.linear(features, self.proj.weight.float(), self.proj.bias.float())
        dated = (doy > 0).unsqueeze(1)
        embedding = torch.where(dated, embedding, torch.zeros_like(embedding))
        return embedding.to(self.proj.weight.dtype if dtype is None else dtype)
