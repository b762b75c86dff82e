"""Building blocks of the DINOv2 Vision Transformer.

Module and parameter names follow the official DINOv2 checkpoints so that their weights load
without any renaming (see ``rsdino.models.pretrained``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear_flops(layer: nn.Linear, tokens: float = 1) -> float:
    """Matmul FLOPs (2 per multiply-add) of ``tokens`` rows through a linear layer."""
    return 2.0 * tokens * layer.in_features * layer.out_features


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each one to a token."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """Map images [B, C, H, W] to patch tokens [B, (H/p)*(W/p), D], row-major over the grid."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Input size {height}x{width} is not divisible by the patch size {self.patch_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)

    def flops(self, n_patches: int) -> float:
        """Matmul FLOPs of embedding ``n_patches`` patches: a dot product per patch and channel."""
        conv = self.proj
        per_patch = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        return 2.0 * n_patches * per_patch * conv.out_channels


class Attention(nn.Module):
    """Multi-head self-attention with one fused projection for queries, keys and values."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))

    def flops(self, tokens: int) -> float:
        """Matmul FLOPs for a ``tokens``-long sequence: projections, then QK^T and AV."""
        dim = self.proj.in_features
        products = 2.0 * 2 * tokens * tokens * dim
        return linear_flops(self.qkv, tokens) + linear_flops(self.proj, tokens) + products


class Mlp(nn.Module):
    """The classic transformer feed-forward network: Linear, GELU, Linear."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def flops_per_token(self) -> float:
        return linear_flops(self.fc1) + linear_flops(self.fc2)


def swiglu_hidden_features(hidden_features: int) -> int:
    """Hidden width DINOv2 uses for SwiGLU: 2/3 of the MLP width (same parameter count, since
    SwiGLU has three matrices instead of two), rounded up to a multiple of 8 for efficient kernels.
    """
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """Gated feed-forward network (SwiGLU) used by DINOv2's ViT-g.

    ``hidden_features`` is the width an ordinary ``Mlp`` would have; it is shrunk by
    ``swiglu_hidden_features`` exactly like DINOv2's fused variant (4096 for ViT-g).
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)

    def flops_per_token(self) -> float:
        return linear_flops(self.w12) + linear_flops(self.w3)


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch, started small to keep deep ViTs stable."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        # In the activations' dtype: an fp32 gain would promote a bf16 residual stream to fp32
        # under autocast (~1.4x the saved activation memory of a bf16 stream).
        return x * self.gamma.to(x.dtype)


def layer_scale(dim: int, init_values: float | None) -> nn.Module:
    """A LayerScale, or Identity when ``init_values`` is None or 0: DINOv2 configs mean "off".

    A zero gain would silence every residual branch; DINOv2 treats 0 as no LayerScale at all, so
    no ``gamma`` exists and checkpoints without ``ls1``/``ls2`` keys load.
    """
    return LayerScale(dim, init_values) if init_values else nn.Identity()


# Layers whose every parameter (scale and shift) is trained without weight decay.
NORM_LAYERS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)


def weight_decay_exempt(module: nn.Module) -> set[str]:
    """Names of ``module``'s parameters that DINOv2 trains without weight decay.

    Those are biases, normalisation parameters and LayerScale gains, recognised by the layer that
    owns them rather than by name patterns. Everything else decays, including learned tokens
    (``cls_token``, ``pos_embed``, ``mask_token``, ``register_tokens``), as in DINOv2.
    """
    exempt: set[str] = set()
    for prefix, layer in module.named_modules():
        for name, _ in layer.named_parameters(recurse=False):
            if (
                name == "bias"
                or isinstance(layer, NORM_LAYERS)
                or (isinstance(layer, LayerScale) and name == "gamma")
            ):
                exempt.add(f"{prefix}.{name}" if prefix else name)
    return exempt


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples during training.

    Kept samples are rescaled by 1/keep_prob so the expected output is unchanged.
    """

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob


# Above this drop rate a training block runs each residual branch on a random subset of the
# batch (DINOv2's threshold); at or below it, on every sample times a Bernoulli mask.
SUBSET_DROP_MIN_RATE = 0.1


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)).

    In training with a drop rate above ``SUBSET_DROP_MIN_RATE`` each branch runs only on the
    rows it keeps (as DINOv2 does): the dropped samples' compute is skipped, not masked away.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        ffn_layer: type[Mlp] | type[SwiGLUFFN] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = layer_scale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ffn_layer(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = layer_scale(dim, init_values)
        self.drop_rate = drop_path
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def attn_residual(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_residual(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.drop_rate > SUBSET_DROP_MIN_RATE:
            x = self._add_on_subset(x, self.attn_residual)
            return self._add_on_subset(x, self.ffn_residual)
        x = x + self.drop_path(self.attn_residual(x))
        return x + self.drop_path(self.ffn_residual(x))

    def branch_rows(self, batch: int) -> int:
        """Samples of a ``batch`` that a residual branch runs on in training.

        Both ``forward`` and ``flops`` use it, so the FLOP count follows what is executed.
        """
        if self.drop_rate > SUBSET_DROP_MIN_RATE:
            return max(int(batch * (1 - self.drop_rate)), 1)
        return batch

    def _add_on_subset(self, x: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        """x plus the branch of a random subset of rows, scaled by batch / subset size.

        The scale keeps the expected residual that of the full batch. The permutation comes from
        the default generator of ``x``'s device, which the trainer seeds every step.
        """
        batch = x.shape[0]
        rows = torch.randperm(batch, device=x.device)[: self.branch_rows(batch)]
        residual = branch(x[rows]).to(x.dtype)
        return torch.index_add(x, 0, rows, residual, alpha=batch / rows.numel())

    def flops(self, tokens: int, executed: bool = False, batch: int | None = None) -> float:
        """Matmul FLOPs of one sequence; norms, LayerScale and activations are noise beside them.

        ``executed=True`` counts what a training step runs for a ``batch`` of sequences: the
        exact share ``branch_rows(batch) / batch`` of the branches, per sequence.
        """
        nominal = self.attn.flops(tokens) + tokens * self.mlp.flops_per_token()
        if not executed:
            return nominal
        if batch is None:
            raise ValueError("executed FLOPs depend on the batch size; pass batch")
        return nominal * self.branch_rows(batch) / batch


class BlockChunk(nn.ModuleList):
    """A group of blocks, for DINOv2's chunked key layout (``blocks.<chunk>.<index>``).

    DINOv2 groups blocks to shard them together; here FSDP2 shards every block on its own and
    the ViT runs them one by one, so a chunk only names its blocks.
    """
