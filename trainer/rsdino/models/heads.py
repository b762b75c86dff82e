"""The DINO / iBOT projection head."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool
) -> nn.Module:
    """Linear [BN] GELU ... Linear, ending at the bottleneck; one layer means a single Linear."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for layer_in, layer_out in pairwise(dims):
        layers.append(nn.Linear(layer_in, layer_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(layer_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2-normalise, then cosine-similarity logits against prototypes.

    ``last_layer`` holds the prototypes; its rows are L2-normalised in ``forward``. That is DINOv2's
    weight-normalised layer with the gain frozen at 1, written without a parametrization so that
    FSDP2 can shard the plain weight.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be at least 1, got {nlayers}")
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # 1e-12 underflows to zero in float16; bfloat16 gets the same floor for its coarse mantissa.
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))
