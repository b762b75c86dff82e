"""The faster training step computes what the reference step computes.

Batch-subset stochastic depth (DINOv2's), the FLOPs it reports, the once-per-crop log-softmax of
the DINO loss and the fused AdamW kernel are each checked against a reference written out here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import Tensor

from rsdino.data.build import build_dataset
from rsdino.data.collate import collate_samples
from rsdino.models.layers import Block
from rsdino.models.vit import VisionTransformer
from rsdino.ssl.losses import DinoClsLoss
from rsdino.ssl.meta_arch import SSLMetaArch
from rsdino.ssl.param_groups import apply_optim_schedule
from rsdino.train import loop
from rsdino.train.loop import Trainer, make_optimizer
from rsdino.train.metrics import estimate_step_cost
from rsdino.train.runtime import resolve_compile

DIM, HEADS, TOKENS = 16, 2, 5


def make_block(drop_path: float) -> Block:
    torch.manual_seed(0)
    return Block(DIM, HEADS, drop_path=drop_path, init_values=0.5).train()


def tokens(batch: int, requires_grad: bool = False) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, TOKENS, DIM, generator=generator).requires_grad_(requires_grad)


def attn_branch(block: Block, x: Tensor) -> Tensor:
    return block.ls1(block.attn(block.norm1(x)))


def ffn_branch(block: Block, x: Tensor) -> Tensor:
    return block.ls2(block.mlp(block.norm2(x)))


def plain_block(block: Block, x: Tensor) -> Tensor:
    """A pre-norm block with no stochastic depth at all."""
    x = x + attn_branch(block, x)
    return x + ffn_branch(block, x)


def subset_block(block: Block, x: Tensor, rate: float) -> Tensor:
    """DINOv2's subset stochastic depth by hand: one permutation per branch, in that order."""
    batch = x.shape[0]
    kept = max(int(batch * (1 - rate)), 1)
    for branch in (attn_branch, ffn_branch):
        rows = torch.randperm(batch)[:kept]
        x = torch.index_add(x, 0, rows, branch(block, x[rows]), alpha=batch / kept)
    return x


# --- (a) no stochastic depth: the plain pre-norm block ---------------------------------------


@pytest.mark.parametrize(("rate", "training"), [(0.0, True), (0.4, False)])
def test_block_without_drops_is_the_plain_pre_norm_block(rate: float, training: bool) -> None:
    block = make_block(rate).train(training)
    x = tokens(6)
    assert torch.equal(block(x), plain_block(block, x))


def test_vit_without_drop_path_is_the_plain_pre_norm_stack() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=16, patch_size=8, in_chans=3, embed_dim=DIM, depth=2, num_heads=HEADS
    ).train()
    images = torch.randn(3, 3, 16, 16)
    expected = vit.prepare_tokens(images)
    for block in vit.blocks:
        expected = plain_block(block, expected)
    out = vit.forward_features(images)
    assert torch.equal(out["x_norm_clstoken"], vit.norm(expected)[:, 0])


def test_low_rates_keep_the_bernoulli_mask_form() -> None:
    block = make_block(0.1)
    x = tokens(6)
    torch.manual_seed(5)
    out = block(x)
    torch.manual_seed(5)
    mask1 = torch.empty(6, 1, 1).bernoulli_(0.9) / 0.9
    middle = x + attn_branch(block, x) * mask1
    mask2 = torch.empty(6, 1, 1).bernoulli_(0.9) / 0.9
    torch.testing.assert_close(out, middle + ffn_branch(block, middle) * mask2, rtol=0, atol=1e-6)


# --- (b)-(d) batch-subset stochastic depth ---------------------------------------------------


@pytest.mark.parametrize(("rate", "batch"), [(0.4, 8), (0.3, 5), (0.9, 3)])
def test_subset_path_equals_the_hand_computed_index_add(rate: float, batch: int) -> None:
    block = make_block(rate)
    x = tokens(batch)
    torch.manual_seed(7)
    out = block(x)
    torch.manual_seed(7)
    torch.testing.assert_close(out, subset_block(block, x, rate), rtol=0, atol=1e-6)
    assert not torch.allclose(out, plain_block(block, x))


def test_subset_path_is_unbiased_per_sample() -> None:
    # 3 samples at rate 0.5: one runs, scaled by 3. A 1 / (1 - rate) = 2 scale would be 1/3 low.
    block = make_block(0.5)
    with torch.no_grad():
        block.ls2.gamma.zero_()  # only the attention branch remains
        x = tokens(3)
        residual = attn_branch(block, x)
        total = torch.zeros_like(x)
        torch.manual_seed(0)
        draws = 600
        for _ in range(draws):
            total += block(x) - x
    factor = (total / draws * residual).sum(dim=(1, 2)) / (residual * residual).sum(dim=(1, 2))
    assert torch.allclose(factor, torch.ones(3), atol=0.2), factor


def _kept_rows(seed: int, batch: int, kept: int) -> tuple[set[int], set[int]]:
    torch.manual_seed(seed)
    return set(torch.randperm(batch)[:kept].tolist()), set(torch.randperm(batch)[:kept].tolist())


def _grads(block: Block, prefix: str) -> list[Tensor]:
    return [p.grad for name, p in block.named_parameters() if name.startswith(prefix)]


def test_gradients_reach_a_branch_only_through_the_rows_it_kept() -> None:
    block, seed, batch = make_block(0.5), 3, 8
    attn_rows, ffn_rows = _kept_rows(seed, batch, kept=4)
    dropped = sorted(set(range(batch)) - attn_rows - ffn_rows)
    attn_only = sorted(attn_rows - ffn_rows)
    assert dropped and attn_only  # the seed gives both kinds of rows

    x = tokens(batch, requires_grad=True)
    torch.manual_seed(seed)
    block(x)[dropped].sum().backward()
    assert all(grad is None or not grad.any() for grad in _grads(block, ""))
    assert torch.equal(x.grad[dropped], torch.ones_like(x.grad[dropped]))
    assert not x.grad[[r for r in range(batch) if r not in dropped]].any()

    block.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    block(x)[attn_only].sum().backward()
    assert all(grad is not None and grad.any() for grad in _grads(block, "attn."))
    assert all(grad is None or not grad.any() for grad in _grads(block, "mlp."))


# --- (e) the FLOPs a step executes -----------------------------------------------------------


def _block_flops(n_tokens: int) -> int:
    """Hand count of one tiny-config block (dim 32, FFN 128) on one sequence."""
    return 2 * n_tokens * 4 * 32 * 32 + 4 * n_tokens**2 * 32 + 2 * n_tokens * 2 * 32 * 128


def test_executed_step_cost_skips_the_dropped_share_of_the_student_blocks() -> None:
    cfg = tiny_config("ibot.loss_weight=0", "student.drop_path_rate=0.4")
    student = SSLMetaArch(cfg).student
    nominal = estimate_step_cost(cfg, student).flops
    executed = estimate_step_cost(cfg, student, executed=True).flops
    # 8 global crops (17 tokens) and 8 local crops (5 tokens) per rank, 2 uniform-rate blocks:
    # each branch runs on int(8 * 0.6) = 4 of 8 crops, so half the block FLOPs are skipped,
    # three times (forward and backward). The teacher runs in full.
    skipped = 3 * (8 * 2 * _block_flops(17) + 8 * 2 * _block_flops(5)) / 2
    assert nominal - executed == skipped
    assert executed < nominal


def test_executed_step_cost_equals_nominal_without_drop_path() -> None:
    cfg = tiny_config("student.drop_path_rate=0")
    student = SSLMetaArch(cfg).student
    assert estimate_step_cost(cfg, student, executed=True) == estimate_step_cost(cfg, student)


# --- (f) a whole training step ---------------------------------------------------------------


def test_a_train_step_with_subset_drop_path_repeats_under_the_same_step_seed(
    tmp_path: Path,
) -> None:
    cfg = tiny_config("student.drop_path_rate=0.3")
    dataset = build_dataset(cfg)
    batch = collate_samples([dataset[index] for index in range(cfg.train.batch_size_per_gpu)])
    runs = []
    for name in ("a", "b"):
        trainer = Trainer(cfg, tmp_path / name, resume=False)
        assert all(block.drop_rate == pytest.approx(0.3) for block in _blocks(trainer))
        losses = trainer.train_step(batch, step=1)
        runs.append((losses, trainer.model.state_dict()))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert all(torch.isfinite(value) for value in losses_a.values())
    assert losses_a.keys() == losses_b.keys()
    assert all(torch.equal(losses_a[key], losses_b[key]) for key in losses_a)
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)


def _blocks(trainer: Trainer) -> list[Block]:
    return [module for module in trainer.model.student.modules() if isinstance(module, Block)]


# --- the DINO loss takes one log-softmax per student crop ------------------------------------


def test_dino_loss_equals_the_per_pair_log_softmax_formula() -> None:
    generator = torch.Generator().manual_seed(2)
    students = [torch.randn(6, 32, generator=generator) for _ in range(3)]
    teachers = [torch.randn(6, 32, generator=generator).softmax(dim=-1) for _ in range(2)]
    weights = [[torch.rand(6, generator=generator) for _ in teachers] for _ in students]
    loss = DinoClsLoss(32, student_temp=0.1)
    for row_weights in (None, weights):
        expected = torch.zeros(())
        for i, student in enumerate(students):
            for j, teacher in enumerate(teachers):
                rows = -(teacher * F.log_softmax(student.float() / 0.1, dim=-1)).sum(dim=-1)
                if row_weights is not None:
                    rows = rows * row_weights[i][j]
                expected = expected + rows.mean()
        torch.testing.assert_close(
            loss(students, teachers, row_weights), expected, atol=1e-6, rtol=0
        )


# --- fused AdamW (CUDA) updates exactly like the foreach kernel ------------------------------


def test_fused_adamw_matches_foreach_on_the_trainer_param_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    foreach_model = SSLMetaArch(cfg)
    fused_model = copy.deepcopy(foreach_model)
    foreach = make_optimizer(cfg, foreach_model)
    monkeypatch.setattr(loop, "_adamw_kernel", lambda model: {"fused": True})
    fused = make_optimizer(cfg, fused_model)
    assert foreach.defaults["foreach"] and fused.defaults["fused"]
    assert len({group["lr_multiplier"] for group in foreach.param_groups}) > 1

    start = [p.detach().clone() for p in foreach_model.student.parameters()]
    generator = torch.Generator().manual_seed(9)
    for _ in range(4):
        for optimizer in (foreach, fused):
            apply_optim_schedule(optimizer, lr=1e-2, wd=0.04, last_layer_lr=1e-2)
        for a, b in zip(
            foreach_model.student.parameters(), fused_model.student.parameters(), strict=True
        ):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        foreach.step()
        fused.step()
    after = list(foreach_model.student.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(start, after, strict=True))
    for a, b in zip(after, fused_model.student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- torch.compile of the blocks (train.compile) ----------------------------------------------


def test_compile_auto_means_cuda_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (resolve_compile("auto", cpu), resolve_compile("auto", cuda)) == (False, True)
    assert (resolve_compile("True", cpu), resolve_compile("false", cuda)) == (True, False)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tmp_path: Path) -> None:
    """Two steps with compiled blocks (stochastic depth on a subset included) give the eager
    losses and weights: compiling is a speed change only, and it keeps the state_dict keys."""
    dataset = build_dataset(tiny_config())
    batch = collate_samples([dataset[index] for index in range(4)])
    runs = {}
    for mode in ("false", "true"):
        trainer = Trainer(
            tiny_config(f"train.compile={mode}", "student.drop_path_rate=0.3"),
            tmp_path / mode,
            resume=False,
        )
        losses = [trainer.train_step(batch, step)["total"] for step in range(2)]
        runs[mode] = (torch.stack(losses), trainer.model.state_dict())
    (eager_losses, eager_state), (compiled_losses, compiled_state) = runs["false"], runs["true"]
    assert torch.allclose(compiled_losses, eager_losses, rtol=1e-5, atol=1e-5)
    assert compiled_state.keys() == eager_state.keys()
    assert all(
        torch.allclose(compiled_state[key], eager_state[key], atol=1e-5) for key in eager_state
    )
