"""DINOv2's Vision Transformer backbone, with official state_dict names, for any number of bands."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rsdino.models.layers import (
    Block,
    BlockChunk,
    Mlp,
    PatchEmbed,
    SwiGLUFFN,
    weight_decay_exempt,
)
from rsdino.models.specs import ARCH_SPECS

FFN_LAYERS: dict[str, type[Mlp] | type[SwiGLUFFN]] = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFN,
    "swiglufused": SwiGLUFFN,
}


def resample_patch_pos_embed(
    patch_pos_embed: Tensor,
    grid: tuple[int, int],
    antialias: bool = False,
    offset: float = 0.0,
) -> Tensor:
    """Bicubically resample a square grid of position embeddings [1, M*M, D] to [1, h*w, D].

    With ``offset > 0`` the target is given as a scale factor (h + offset) / M, as DINOv2 does, so
    that the sampling positions match the weights DINOv2 was trained with; the extra fraction only
    guards the floor() that turns the scale back into an integer size.
    """
    _, num_patches, dim = patch_pos_embed.shape
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"Position embedding of {num_patches} patches is not a square grid")
    height, width = grid
    image = patch_pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((height + offset) / side, (width + offset) / side)
        resized = F.interpolate(image, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        resized = F.interpolate(image, size=grid, mode="bicubic", antialias=antialias)
    if tuple(resized.shape[-2:]) != (height, width):
        raise ValueError(f"Resampled position grid {tuple(resized.shape[-2:])} is not {grid}")
    return resized.permute(0, 2, 3, 1).reshape(1, height * width, dim).to(patch_pos_embed.dtype)


def _init_linear(module: nn.Module) -> None:
    """Truncated-normal Linear weights and zero biases, the ViT initialisation DINOv2 uses."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT backbone matching DINOv2: class token, optional register tokens, mask token for iBOT.

    Setting ``grad_checkpointing`` trades compute for memory: each block keeps only its input and
    recomputes its activations during backward. ``init_values`` None or 0 means no LayerScale.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"Unknown ffn_layer {ffn_layer!r}; expected one of {list(FFN_LAYERS)}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if block_chunks > 1 and depth % block_chunks:
            raise ValueError(f"depth {depth} cannot be split into {block_chunks} equal chunks")
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.n_blocks = depth
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.in_chans = in_chans
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.grad_checkpointing = False

        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            if num_register_tokens > 0
            else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        if drop_path_uniform:
            drop_rates = [drop_path_rate] * depth
        else:
            drop_rates = torch.linspace(0.0, drop_path_rate, depth).tolist()
        blocks = [
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=drop_rates[i],
                init_values=init_values,
                ffn_layer=FFN_LAYERS[ffn_layer],
            )
            for i in range(depth)
        ]
        self.chunked_blocks = block_chunks > 1
        if self.chunked_blocks:
            # Identity padding keeps each block's global index inside its chunk, as in DINOv2.
            chunk_size = depth // block_chunks
            self.blocks = nn.ModuleList(
                BlockChunk([nn.Identity()] * start + blocks[start : start + chunk_size])
                for start in range(0, depth, chunk_size)
            )
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self._init_weights()

    def no_weight_decay(self) -> set[str]:
        """Parameter names trained without weight decay: biases, norms, LayerScale gains."""
        return weight_decay_exempt(self)

    def layerwise_lr_steps(self) -> dict[str, int]:
        """How many layer-wise lr decay factors each parameter's lr gets (DINOv2's depths,
        counted from the top): the patch embedding and learned tokens ``n_blocks + 1``, block
        ``i`` ``n_blocks - i``, the final norm 0. Told by module, not parsed from names, so
        chunked blocks and any prefix agree."""
        blocks = [module for module in self.modules() if isinstance(module, Block)]
        steps = {
            id(param): len(blocks) - index
            for index, block in enumerate(blocks)
            for param in block.parameters()
        }
        tokens = (self.cls_token, self.pos_embed, self.mask_token, self.register_tokens)
        bottom = [*self.patch_embed.parameters(), *(t for t in tokens if t is not None)]
        steps.update({id(param): len(blocks) + 1 for param in bottom})
        return {name: steps.get(id(param), 0) for name, param in self.named_parameters()}

    def forward_flops(
        self, image_size: int, executed: bool = False, batch: int | None = None
    ) -> float:
        """Matmul FLOPs of one ``image_size`` x ``image_size`` image through the backbone.

        Counted from the layers themselves (patch embedding, then each block's attention and
        feed-forward network), so metrics and benchmarks cannot disagree with what is built.
        ``executed=True`` counts a training forward of ``batch`` images, where stochastic depth
        skips part of the residual branches (``Block.flops``).
        """
        n_patches = (image_size // self.patch_size) ** 2
        tokens = n_patches + 1 + self.num_register_tokens
        blocks = [block for block in self.modules() if isinstance(block, Block)]
        return self.patch_embed.flops(n_patches) + sum(
            block.flops(tokens, executed=executed, batch=batch) for block in blocks
        )

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.apply(_init_linear)

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embedding [1, 1+N, D] for an input of h x w pixels, in ``x``'s dtype.

        Returns the stored parameter itself (cast) when the input grid equals the training grid:
        added in fp32 it would promote a bf16 token stream to fp32 under autocast.
        """
        grid = (h // self.patch_size, w // self.patch_size)
        stored_side = math.isqrt(self.pos_embed.shape[1] - 1)
        if grid == (stored_side, stored_side):
            return self.pos_embed.to(x.dtype)
        patch_pos = resample_patch_pos_embed(
            self.pos_embed[:, 1:].float(),
            grid,
            antialias=self.interpolate_antialias,
            offset=self.interpolate_offset,
        )
        class_pos = self.pos_embed[:, :1].float()
        return torch.cat((class_pos, patch_pos), dim=1).to(x.dtype)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images [B, C, H, W] to tokens [B, 1+R+N, D]: cls, registers, then patches.

        Masked patches (``masks[B, N]`` True) are replaced by the mask token before the position
        embedding is added, so the model still knows where the hidden patch was.
        """
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, height, width)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens

    def forward_features(
        self, x: Tensor, masks: Tensor | None = None, token_bias: Tensor | None = None
    ) -> dict[str, Tensor | None]:
        """Run the backbone; split the normalised output into class, register and patch tokens.

        ``token_bias`` [B, D] (e.g. an acquisition-date embedding) is added to every token before
        the blocks, so that conditioning reaches all of them without changing the weights' layout.
        """
        tokens = self.prepare_tokens(x, masks)
        if token_bias is not None:
            tokens = tokens + token_bias.unsqueeze(1).to(tokens.dtype)
        # Block by block even when chunked: a checkpoint then spans exactly one FSDP unit.
        for block in self._flat_blocks():
            tokens = self._run_block(block, tokens)
        normed = self.norm(tokens)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def _run_block(self, block: nn.Module, tokens: Tensor) -> Tensor:
        """One block, checkpointed when asked to and when autograd records the forward.

        Without autograd (the teacher, evaluation) no activation is stored anyway, so the
        recompute would be pure cost. The recompute replays the block's random draws (stochastic
        depth), so the gradients equal those of the stored activations.
        """
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, tokens, use_reentrant=False)
        return block(tokens)

    def compile_blocks(self) -> None:
        """torch.compile every block in place, one graph per block as torchtitan does: the
        parameter names and checkpoint keys do not change, and activation checkpointing and
        FSDP2 wrap the compiled blocks as they wrap plain ones."""
        for block in self._flat_blocks():
            block.compile()

    def _flat_blocks(self) -> list[nn.Module]:
        """The transformer blocks in order, without the Identity padding of chunks."""
        if not self.chunked_blocks:
            return list(self.blocks)
        return [b for chunk in self.blocks for b in chunk if not isinstance(b, nn.Identity)]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """Patch tokens after the last ``n`` blocks (or after the blocks indexed by ``n``).

        ``reshape`` gives feature maps [B, D, H/p, W/p]; ``return_class_token`` pairs each output
        with its class token, as DINOv2's linear probes expect.
        """
        blocks = self._flat_blocks()
        wanted = set(range(len(blocks) - n, len(blocks)) if isinstance(n, int) else n)
        if not wanted <= set(range(len(blocks))):
            raise ValueError(f"Block indices {sorted(wanted)} outside 0..{len(blocks) - 1}")
        tokens = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(blocks):
            tokens = block(tokens)
            if index in wanted:
                outputs.append(self.norm(tokens) if norm else tokens)
        class_tokens = [out[:, 0] for out in outputs]
        patch_tokens = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            grid = (height // self.patch_size, width // self.patch_size)
            patch_tokens = [
                out.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous()
                for out in patch_tokens
            ]
        if return_class_token:
            return tuple(zip(patch_tokens, class_tokens, strict=True))
        return tuple(patch_tokens)

    def forward(
        self,
        x: Tensor,
        masks: Tensor | None = None,
        is_training: bool = False,
        token_bias: Tensor | None = None,
    ) -> Tensor | dict[str, Tensor | None]:
        """Training returns the ``forward_features`` dict; otherwise the class-token embedding."""
        features = self.forward_features(x, masks, token_bias)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])


def build_vit(
    arch: str,
    *,
    img_size: int,
    patch_size: int,
    in_chans: int,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    **kwargs: Any,
) -> VisionTransformer:
    """Build a named ViT; explicit embed_dim/depth/num_heads override the named sizes."""
    if arch not in ARCH_SPECS:
        raise ValueError(f"Unknown arch {arch!r}; expected one of {list(ARCH_SPECS)}")
    spec_dim, spec_depth, spec_heads = ARCH_SPECS[arch]
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=spec_dim if embed_dim is None else embed_dim,
        depth=spec_depth if depth is None else depth,
        num_heads=spec_heads if num_heads is None else num_heads,
        **kwargs,
    )
