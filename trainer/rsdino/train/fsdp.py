"""FSDP2 sharding of the student/teacher pair and full-state (de)serialisation across ranks.

Every transformer block is its own FSDP unit (so only one block's full weights exist at a time),
then each encoder and head; the teacher is sharded like the student, so the EMA update runs on
matching local shards without communication.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rsdino.models.encoder import RemoteSensingEncoder
from rsdino.ssl.meta_arch import SSLMetaArch

_FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _blocks(encoder: RemoteSensingEncoder) -> list[nn.Module]:
    blocks = []
    for backbone in encoder.backbones.values():
        for entry in backbone.blocks:
            # Chunked backbones hold BlockChunks padded with Identity; shard the real blocks.
            children = entry if isinstance(entry, nn.ModuleList) else [entry]
            blocks.extend(b for b in children if not isinstance(b, nn.Identity))
    return blocks


def shard_model(model: SSLMetaArch, param_dtype: torch.dtype | None) -> None:
    """Apply ``fully_shard`` per block, per encoder/head, for student and teacher alike.

    ``param_dtype`` is the compute dtype of the gathered weights (bf16 on GPUs); gradients are
    always reduced in fp32, which keeps the update exact where it matters.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for side in (model.student, model.teacher):
        for name, module in side.items():
            if name == "encoder":
                for block in _blocks(module):
                    fully_shard(block, mp_policy=policy)
            fully_shard(module, mp_policy=policy)


def reshard_teacher(model: SSLMetaArch) -> None:
    """Free the teacher's gathered weights after its forward pass.

    FSDP2 keeps a root module's weights gathered after forward for the backward that follows;
    the teacher has no backward, so without this its full weights would stay in memory and its
    parameters would not be the shards the EMA update expects.
    """
    for module in model.teacher.values():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded model and optimiser state on the CPU (a collective: every rank calls it)."""
    return {
        "model": get_model_state_dict(model, options=_FULL_STATE),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=_FULL_STATE),
    }


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an unsharded state into a model sharded over any number of ranks."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
