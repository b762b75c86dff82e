"""Activation checkpointing and the mixed-precision keys: same maths, less memory, clear config."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config

import rsdino.models.vit as vit_module
from rsdino.config.loader import ConfigError
from rsdino.data.masking import sample_ibot_masks
from rsdino.errors import RsdinoError
from rsdino.models.vit import build_vit
from rsdino.ssl.meta_arch import SSLBatch, SSLMetaArch
from rsdino.train.fsdp import shard_model
from rsdino.train.runtime import resolve_reduce_precision

STOCHASTIC_DEPTH = "student.drop_path_rate=0.5"
BATCH = 2


def _batch() -> SSLBatch:
    """Two global and two local crops of ``BATCH`` images, with iBOT masks on the globals."""
    generator = torch.Generator().manual_seed(1)
    masks = sample_ibot_masks(2 * BATCH, (4, 4), (0.1, 0.5), 0.5, generator)
    return SSLBatch(
        global_crops={"s2": torch.randn(2 * BATCH, 13, 32, 32, generator=generator)},
        local_crops={"s2": torch.randn(2 * BATCH, 13, 16, 16, generator=generator)},
        masks=masks,
    )


def _model(checkpointing: bool, *overrides: str) -> SSLMetaArch:
    torch.manual_seed(0)
    flag = f"train.activation_checkpointing={str(checkpointing).lower()}"
    return SSLMetaArch(tiny_config(STOCHASTIC_DEPTH, flag, *overrides)).train()


def _loss_and_grads(
    model: SSLMetaArch, seed: int = 5
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """One student step from a fixed random state; sharded gradients are gathered to full ones."""
    torch.manual_seed(seed)
    total, _ = model.compute_losses(_batch(), teacher_temp=0.04)
    total.backward()
    grads = {}
    for name, param in model.student.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return total.detach(), grads


def _count_block_calls(model: SSLMetaArch, side: str) -> list[int]:
    """A counter of forward calls over every transformer block of one side's backbone."""
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    for block in getattr(model, side)["encoder"].backbones["s2"]._flat_blocks():
        block.register_forward_pre_hook(count)
    return calls


@pytest.fixture
def single_rank_group() -> Iterator[None]:
    """A one-process gloo group, enough for FSDP2 to shard (trivially) and reduce gradients."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # The FSDP2 modules hold the group in reference cycles. Collect them here: if a later
        # test's forked DataLoader worker collected them, the gloo destructor would hang there.
        gc.collect()


@pytest.mark.parametrize("block_chunks", [1, 2])
def test_checkpointing_gives_the_same_loss_and_gradients(block_chunks: int) -> None:
    chunks = f"student.block_chunks={block_chunks}"
    plain = _model(False, chunks)
    checkpointed = _model(True, chunks)
    recomputed = _count_block_calls(checkpointed, "student")

    loss_plain, grads_plain = _loss_and_grads(plain)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed)

    # depth 2, two student forwards (global + local crops), each block run again in backward
    assert recomputed[0] == 2 * 2 * 2
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_stochastic_depth_is_active_in_the_comparison() -> None:
    """Another seed drops other branches; so equal losses above mean the recompute replayed them."""
    loss_a, _ = _loss_and_grads(_model(False), seed=5)
    loss_b, _ = _loss_and_grads(_model(False), seed=6)
    assert not torch.equal(loss_a, loss_b)


def test_teacher_forward_is_never_checkpointed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.nn.Module] = []

    def spy(block: torch.nn.Module, tokens: torch.Tensor, **kwargs: bool) -> torch.Tensor:
        calls.append(block)
        return torch.utils.checkpoint.checkpoint(block, tokens, **kwargs)

    monkeypatch.setattr(vit_module, "checkpoint", spy)
    model = _model(True)
    teacher_calls = _count_block_calls(model, "teacher")
    _loss_and_grads(model)

    teacher_backbone = model.teacher["encoder"].backbones["s2"]
    student_backbone = model.student["encoder"].backbones["s2"]
    assert not teacher_backbone.grad_checkpointing
    assert teacher_calls[0] == 2  # one forward of its 2 blocks, nothing recomputed
    student_blocks = set(student_backbone._flat_blocks())
    assert len(calls) == 2 * 2 and set(calls) == student_blocks


def test_checkpointing_backbone_skips_the_checkpoint_without_autograd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[torch.Tensor] = []

    def spy(block: torch.nn.Module, tokens: torch.Tensor, **_: bool) -> torch.Tensor:
        calls.append(tokens)
        return block(tokens)

    monkeypatch.setattr(vit_module, "checkpoint", spy)
    vit = build_vit(
        "vit_small", img_size=16, patch_size=8, in_chans=2, embed_dim=16, depth=3, num_heads=2
    )
    vit.grad_checkpointing = True
    images = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        vit(images)
    assert calls == []
    vit(images)
    assert len(calls) == 3


def test_checkpointing_under_fsdp2_matches_the_plain_model(single_rank_group: None) -> None:
    loss_plain, grads_plain = _loss_and_grads(_model(False))
    sharded = _model(True)
    shard_model(sharded, None, torch.float32)
    loss_sharded, grads_sharded = _loss_and_grads(sharded)
    torch.testing.assert_close(loss_sharded, loss_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_sharded[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_reduce_rounds_the_gradients_to_bf16(single_rank_group: None) -> None:
    """With one rank the reduction is a copy, so only the dtype round trip changes the values."""
    _, grads_plain = _loss_and_grads(_model(False))
    sharded = _model(False)
    shard_model(sharded, None, resolve_reduce_precision("bf16"))
    _, grads_sharded = _loss_and_grads(sharded)
    assert any(not torch.equal(g, g.bfloat16().float()) for g in grads_plain.values())
    for name, grad in grads_plain.items():
        assert grads_sharded[name].dtype == torch.float32, name
        torch.testing.assert_close(grads_sharded[name], grad.bfloat16().float(), msg=name)


def test_reduce_precision_names_map_to_dtypes() -> None:
    assert resolve_reduce_precision("fp32") is torch.float32
    assert resolve_reduce_precision("bf16") is torch.bfloat16
    with pytest.raises(RsdinoError, match=r"train\.reduce_precision"):
        resolve_reduce_precision("fp16")


def test_config_defaults_and_choices() -> None:
    default = tiny_config()
    assert default.train.reduce_precision == "fp32"
    assert default.train.activation_checkpointing is False
    assert tiny_config("train.reduce_precision=bf16").train.reduce_precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.reduce_precision='fp16x'"):
        tiny_config("train.reduce_precision=fp16x")


def test_dinov2_compute_precision_keys_point_to_their_replacement() -> None:
    with pytest.raises(ConfigError, match="compute_precision") as error:
        tiny_config("compute_precision.grad_scaler=true")
    assert "train.precision" in str(error.value)
    assert "train.reduce_precision" in str(error.value)


def _blocks_and_saved_dtypes(autocast: bool) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """Dtypes of every block's output and of every saved activation of the token stream's shape
    [B, T, D], over one training forward of a ViT with LayerScale and position embeddings."""
    torch.manual_seed(0)
    model = build_vit("vit_small", patch_size=8, img_size=32, in_chans=3, init_values=1e-5)
    model.train()
    images = torch.randn(2, 3, 32, 32)
    stream_shape = (2, 1 + (32 // 8) ** 2, model.embed_dim)
    block_dtypes: set[torch.dtype] = set()
    saved_dtypes: set[torch.dtype] = set()
    for block in model.modules():
        if type(block).__name__ == "Block":
            block.register_forward_hook(lambda _m, _i, out: block_dtypes.add(out.dtype))

    def pack(saved: torch.Tensor) -> torch.Tensor:
        if tuple(saved.shape) == stream_shape:
            saved_dtypes.add(saved.dtype)
        return saved

    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved),
    ):
        model.forward_features(images)
    return block_dtypes, saved_dtypes


def test_the_residual_stream_stays_in_the_autocast_dtype() -> None:
    """fp32 parameters added to or multiplied into the stream (position embedding, LayerScale)
    must not promote a bf16 stream back to fp32: its saved activations would cost ~1.4x."""
    blocks, saved = _blocks_and_saved_dtypes(autocast=True)
    assert blocks == {torch.bfloat16}
    assert saved == {torch.bfloat16}
    assert _blocks_and_saved_dtypes(autocast=False) == ({torch.float32}, {torch.float32})
