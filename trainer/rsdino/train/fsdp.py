"""FSDP2 sharding of the student/teacher pair.

Every transformer block is its own FSDP unit, then each encoder and head; the teacher is sharded
like the student, so the EMA update runs on matching local shards without communication. The
student keeps gathered weights from its first forward to its backward; the teacher, which has no
backward, frees each block's weights after using them.
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rsdino.models.encoder import RemoteSensingEncoder
from rsdino.ssl.meta_arch import SSLMetaArch

# The encoders return slices of one normalised token tensor ([CLS], registers, patches). FSDP2
# warns about any view output because an in-place op on it would skip the backward hook; no
# caller modifies these outputs in place (the heads and losses are out-of-place), so the
# warning is noise in every multi-GPU log.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def _backbone_blocks(encoder: RemoteSensingEncoder) -> list[list[nn.Module]]:
    """Each backbone's transformer blocks, in the order its forward runs them."""
    per_backbone = []
    for backbone in encoder.backbones.values():
        blocks = []
        for entry in backbone.blocks:
            # Chunked backbones hold BlockChunks padded with Identity; shard the real blocks.
            children = entry if isinstance(entry, nn.ModuleList) else [entry]
            blocks.extend(b for b in children if not isinstance(b, nn.Identity))
        per_backbone.append(blocks)
    return per_backbone


def shard_model(
    model: SSLMetaArch,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype = torch.float32,
) -> None:
    """Apply ``fully_shard`` per block, per encoder/head, for student and teacher alike.

    ``param_dtype`` is the compute dtype of the gathered weights (bf16 on GPUs; None keeps fp32)
    and ``reduce_dtype`` the dtype gradients are reduce-scattered in. Together they replace
    DINOv2's per-module ``compute_precision`` block: the sharded master weights and the optimiser
    stay fp32 either way.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for side in (model.student, model.teacher):
        # The student runs two forwards (global crops, then local crops) before its backward:
        # keeping each block's gathered weights until the backward (DINOv2's SHARD_GRAD_OP)
        # saves two all-gathers per block per step, for the student's unsharded compute-dtype
        # weights held through the step (0.6 GB for a bf16 ViT-L).
        keep_gathered = side is model.student
        for name, module in side.items():
            if name == "encoder":
                for blocks in _backbone_blocks(module):
                    for block in blocks:
                        fully_shard(
                            block, mp_policy=policy, reshard_after_forward=not keep_gathered
                        )
                    _prefetch_next_in_forward(blocks)
            fully_shard(module, mp_policy=policy, reshard_after_forward=not keep_gathered)


def _prefetch_next_in_forward(blocks: list[nn.Module]) -> None:
    """Start each block's all-gather while the block before it computes (FSDP2 overlaps the
    backward's gathers by itself, the forward's only when told)."""
    for block, following in itertools.pairwise(blocks):
        block.set_modules_to_forward_prefetch([following])


def reshard_teacher(model: SSLMetaArch) -> None:
    """Free the teacher's gathered weights after its forward pass.

    FSDP2 keeps a root module's weights gathered after forward for the backward that follows;
    the teacher has no backward, so without this its full weights would stay in memory and its
    parameters would not be the shards the EMA update expects.
    """
    for module in model.teacher.values():
        if isinstance(module, FSDPModule):
            module.reshard()
