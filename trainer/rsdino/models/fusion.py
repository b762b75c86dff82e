"""Fusion of co-registered token sequences from several modalities into one sequence.

Sentinel-1 and Sentinel-2 each have their own ViT; since their crops and patch grids coincide,
token i of one stream describes the same ground as token i of the other. Fusion therefore works
token by token and returns one [B, T, out_dim] sequence, whatever the method, so that the DINO and
iBOT heads downstream do not depend on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsdino.models.layers import Mlp


def _ordered_streams(tokens: dict[str, Tensor], dims: dict[str, int]) -> list[Tensor]:
    """The streams in sorted modality order, after checking names, widths and token grids."""
    if set(tokens) != set(dims):
        raise ValueError(f"expected tokens for modalities {sorted(dims)}, got {sorted(tokens)}")
    streams = [tokens[name] for name in sorted(dims)]
    for name, stream in zip(sorted(dims), streams, strict=True):
        if stream.ndim != 3 or stream.shape[-1] != dims[name]:
            raise ValueError(
                f"tokens[{name!r}] must have shape [B, T, {dims[name]}], got {tuple(stream.shape)}"
            )
    if len({stream.shape[:2] for stream in streams}) != 1:
        grids = {name: tuple(tokens[name].shape[:2]) for name in sorted(dims)}
        raise ValueError(f"modalities must share batch and token count, got {grids}")
    return streams


class LinearFusion(nn.Module):
    """Concatenate the modalities' features per token, project to ``out_dim``, normalise."""

    def __init__(self, dims: dict[str, int], out_dim: int) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"fusion needs at least two modalities, got {sorted(dims)}")
        self.dims = dict(dims)
        self.out_dim = out_dim
        self.proj = nn.Linear(sum(dims.values()), out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=1e-6)

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        """Tokens {name: [B, T, D_name]} to [B, T, out_dim]."""
        return self.norm(self.proj(torch.cat(_ordered_streams(tokens, self.dims), dim=-1)))


class CrossAttention(nn.Module):
    """Multi-head attention of one stream's queries over another stream's keys and values."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Queries from ``x`` [B, Nq, D], keys and values from ``context`` [B, Nk, D]."""
        batch, n_query, dim = x.shape
        head_dim = dim // self.num_heads
        query = self.q(x).reshape(batch, n_query, self.num_heads, head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(batch, context.shape[1], 2, self.num_heads, head_dim)
        key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, Nk, head_dim]
        dropout_p = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p)
        out = self.proj(attended.transpose(1, 2).reshape(batch, n_query, dim))
        return self.proj_drop(out)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block where one stream reads the other: cross attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context))
        return x + self.mlp(self.norm2(x))


class CrossAttentionFusion(nn.Module):
    """Two streams exchange information through cross attention, then are fused linearly.

    Each layer updates both streams from the layer's inputs (neither direction sees the other's
    update first), so the result does not depend on which modality is named first.
    """

    def __init__(
        self, dims: dict[str, int], out_dim: int, nhead: int, nlayer: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if len(dims) != 2:
            raise ValueError(
                f"cross-attention fusion needs exactly two modalities, got {sorted(dims)}"
            )
        if out_dim % nhead:
            raise ValueError(f"out_dim {out_dim} is not divisible by nhead {nhead}")
        if nlayer < 0:
            raise ValueError(f"nlayer must be >= 0, got {nlayer}")
        self.dims = dict(dims)
        self.out_dim = out_dim
        self.modalities = sorted(dims)
        self.input_proj = nn.ModuleDict(
            {
                name: nn.Identity() if dim == out_dim else nn.Linear(dim, out_dim)
                for name, dim in sorted(dims.items())
            }
        )
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {name: CrossAttentionBlock(out_dim, nhead, dropout) for name in self.modalities}
            )
            for _ in range(nlayer)
        )
        self.fuse = LinearFusion(dict.fromkeys(self.modalities, out_dim), out_dim)

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        """Tokens {name: [B, T, D_name]} to [B, T, out_dim]."""
        streams = _ordered_streams(tokens, self.dims)
        first, second = self.modalities
        x = {
            name: self.input_proj[name](stream)
            for name, stream in zip(self.modalities, streams, strict=True)
        }
        for layer in self.layers:
            x = {
                first: layer[first](x[first], x[second]),
                second: layer[second](x[second], x[first]),
            }
        return self.fuse(x)
