"""The DINO / iBOT projection head."""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsdino.models.layers import weight_decay_exempt


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


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``weight_g * weight_v / ||weight_v||`` per output row.

    The DINO head's prototypes, as DINOv2's ``weight_norm(nn.Linear)``: same state_dict names
    (``weight_g`` [out, 1], ``weight_v`` [out, in]), so DINOv2 training checkpoints load, and a
    trainable gain. Written with two plain parameters rather than a parametrization so that FSDP2
    shards them and distributed checkpoints save them like any other weight.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # nn.Linear's initialisation, which DINOv2's layer keeps; the gain then starts at 1.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def normalised_weight(self) -> Tensor:
        """The effective [out, in] weight, computed in float32 whatever the parameters' dtype."""
        direction = self.weight_v.float()
        row_norms = torch.linalg.vector_norm(direction, dim=1, keepdim=True)
        return direction * (self.weight_g.float() / row_norms)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalised_weight().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2-normalise, then scaled cosine-similarity logits to prototypes.

    ``last_layer`` holds the prototypes as a :class:`WeightNormLinear`: each logit is the cosine
    similarity to a prototype times that prototype's trainable gain (1 at the start), as in DINOv2.
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
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def no_weight_decay(self) -> set[str]:
        """Parameter names trained without weight decay: the MLP's biases (and norms, if any).

        The prototypes' gain ``last_layer.weight_g`` decays, as it does in DINOv2.
        """
        return weight_decay_exempt(self)

    def frozen_at_start(self) -> set[str]:
        """Parameter names DINOv2 keeps frozen for ``optim.freeze_last_layer_epochs``: the
        prototypes (gain and direction), which would otherwise collapse early."""
        return {f"last_layer.{name}" for name, _ in self.last_layer.named_parameters()}

    def flops_per_token(self) -> float:
        """Matmul FLOPs of one token: the MLP to the bottleneck, then the prototypes."""
        layers = [m for m in self.modules() if isinstance(m, nn.Linear | WeightNormLinear)]
        return sum(2.0 * layer.in_features * layer.out_features for layer in layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # 1e-12 underflows to zero in float16; bfloat16 gets the same floor for its coarse mantissa.
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
