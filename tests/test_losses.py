import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rsdino.ssl.losses import (
    DinoClsLoss,
    IBotPatchLoss,
    KoLeoLoss,
    dino_loss_terms,
    normalise_dino_losses,
)


def _manual_cross_entropy(student_row: list[float], teacher_row: list[float], temp: float) -> float:
    exps = [math.exp(value / temp) for value in student_row]
    total = sum(exps)
    return -sum(t * math.log(e / total) for t, e in zip(teacher_row, exps, strict=True))


def test_dino_loss_matches_manual_cross_entropy() -> None:
    student = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    teacher = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    loss = DinoClsLoss(out_dim=3, student_temp=0.5)(
        [torch.tensor(student)], [torch.tensor(teacher)]
    )
    # Row 1 is uniform over 3 prototypes, so its cross-entropy against a one-hot is log 3.
    row0 = _manual_cross_entropy(student[0], teacher[0], 0.5)
    expected = (row0 + math.log(3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_sums_all_student_teacher_pairs() -> None:
    students = [[[0.0, 1.0]], [[2.0, 0.0]]]
    teachers = [[[0.9, 0.1]], [[0.25, 0.75]]]
    loss = DinoClsLoss(out_dim=2, student_temp=1.0)(
        [torch.tensor(s) for s in students], [torch.tensor(t) for t in teachers]
    )
    expected = sum(
        _manual_cross_entropy(s[0], t[0], 1.0) for s in students for t in teachers
    )  # four pairs
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_normalise_dino_losses_turns_swapped_global_mean_into_pair_mean() -> None:
    # Two global crops stacked, each matched with the other teacher crop: the batch mean is the
    # mean of the 2 global pairs; with 3 local crops there are 2 + 6 = 8 pairs in all.
    crop_a, crop_b = [1.0, 0.0], [0.0, 1.0]
    teacher_a, teacher_b = [0.7, 0.3], [0.4, 0.6]
    loss_fn = DinoClsLoss(out_dim=2, student_temp=1.0)
    global_loss = loss_fn([torch.tensor([crop_a, crop_b])], [torch.tensor([teacher_b, teacher_a])])
    local_loss = torch.tensor(6.0)
    scaled_global, scaled_local = normalise_dino_losses(
        global_loss, local_loss, n_global_crops=2, n_local_crops=3
    )
    pair_sum = _manual_cross_entropy(crop_a, teacher_b, 1.0) + _manual_cross_entropy(
        crop_b, teacher_a, 1.0
    )
    assert scaled_global.item() == pytest.approx(pair_sum / 8, rel=1e-6)
    assert scaled_local.item() == pytest.approx(6.0 / 8)
    # Three global crops: 3 * 2 global pairs whose mean is given, and 3 * 1 local pairs.
    scaled_global, scaled_local = normalise_dino_losses(
        torch.tensor(0.5), torch.tensor(6.0), n_global_crops=3, n_local_crops=1
    )
    assert scaled_global.item() == pytest.approx(0.5 * 6 / 9)
    assert scaled_local.item() == pytest.approx(6.0 / 9)


def test_dino_loss_terms() -> None:
    assert dino_loss_terms(2, 8) == (2, 16)
    assert dino_loss_terms(2, 0) == (2, 0)
    assert dino_loss_terms(3, 1) == (6, 3)


def test_softmax_center_teacher_matches_formula() -> None:
    loss_fn = DinoClsLoss(out_dim=3)
    loss_fn.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    probs = loss_fn.softmax_center_teacher(torch.tensor([[1.0, 1.0, 1.0]]), teacher_temp=0.5)
    # (t - c) / T = [0, 2, 4]
    denominator = 1 + math.exp(2) + math.exp(4)
    expected = [1 / denominator, math.exp(2) / denominator, math.exp(4) / denominator]
    assert probs[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_update_center_is_ema_of_batch_means() -> None:
    loss_fn = DinoClsLoss(out_dim=2, center_momentum=0.9)
    loss_fn.update_center(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # mean [2, 3]
    loss_fn.update_center(torch.tensor([[0.0, 0.0], [10.0, -10.0], [2.0, 4.0]]))  # mean [4, -2]
    # 0.9 * (0.1 * [2, 3]) + 0.1 * [4, -2]
    assert loss_fn.center[0].tolist() == pytest.approx([0.58, 0.07], abs=1e-6)


# Teacher scores exp(logit) = [[1, 2], [3, 2]] (temperature 1). One Sinkhorn iteration:
# prototype columns [1, 3] / 4 and [2, 2] / 4, then each sample's row rescaled to sum to 1:
# [0.25, 0.5] / 0.75 and [0.75, 0.5] / 1.25.
_TWO_BY_TWO_LOGITS = [[math.log(1.0), math.log(2.0)], [math.log(3.0), math.log(2.0)]]
_TWO_BY_TWO_ONE_ITERATION = [[1 / 3, 2 / 3], [0.6, 0.4]]


def test_sinkhorn_one_iteration_matches_hand_computation() -> None:
    probs = DinoClsLoss(out_dim=2).sinkhorn_knopp_teacher(
        torch.tensor(_TWO_BY_TWO_LOGITS), teacher_temp=1.0, n_iterations=1
    )
    assert probs.tolist()[0] == pytest.approx(_TWO_BY_TWO_ONE_ITERATION[0], rel=1e-5)
    assert probs.tolist()[1] == pytest.approx(_TWO_BY_TWO_ONE_ITERATION[1], rel=1e-5)


def test_sinkhorn_rows_are_distributions_and_prototypes_balance() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=generator)
    probs = DinoClsLoss(out_dim=4).sinkhorn_knopp_teacher(logits, teacher_temp=0.5, n_iterations=3)
    assert probs.sum(dim=1).tolist() == pytest.approx([1.0] * 8, abs=1e-5)
    # After enough iterations the prototype marginals converge to B / K = 2 (tolerance 1e-4).
    converged = DinoClsLoss(out_dim=4).sinkhorn_knopp_teacher(
        logits, teacher_temp=0.5, n_iterations=200
    )
    assert converged.sum(dim=0).tolist() == pytest.approx([2.0] * 4, abs=1e-4)


def test_sinkhorn_rebalances_a_skewed_batch() -> None:
    # Every sample prefers prototype 0; a plain softmax would put most of the batch there.
    logits = torch.tensor([[2.0, 0.0], [1.5, 0.0], [1.0, 0.0], [0.5, 0.0]])
    softmax_mass = torch.softmax(logits, dim=1)[:, 0].sum().item()
    probs = DinoClsLoss(out_dim=2).sinkhorn_knopp_teacher(logits, teacher_temp=1.0, n_iterations=50)
    assert softmax_mass > 2.5
    assert probs[:, 0].sum().item() == pytest.approx(2.0, abs=1e-3)
    # The weakest preference now goes to the other prototype; the order of preferences remains.
    assert probs[3, 1].item() > 0.5
    assert probs[:, 0].tolist() == sorted(probs[:, 0].tolist(), reverse=True)


def test_ibot_sinkhorn_ignores_padding_rows_and_keeps_count() -> None:
    logits = torch.tensor([*_TWO_BY_TWO_LOGITS, [100.0, -5.0]])  # last row is padding
    count = torch.tensor(2)
    probs = IBotPatchLoss(patch_out_dim=2).sinkhorn_knopp_teacher(
        logits, teacher_temp=1.0, n_masked_patches_tensor=count, n_iterations=1
    )
    assert probs.tolist()[0] == pytest.approx(_TWO_BY_TWO_ONE_ITERATION[0], rel=1e-5)
    assert probs.tolist()[1] == pytest.approx(_TWO_BY_TWO_ONE_ITERATION[1], rel=1e-5)
    assert probs[2].tolist() == [0.0, 0.0]
    assert count.item() == 2


def test_ibot_masked_loss_weights_patches_per_image() -> None:
    # Image A has 1 masked patch (row 0), image B has 2 (rows 1, 2); a third image is unmasked.
    student = [[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]]
    teacher = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    loss = IBotPatchLoss(patch_out_dim=2, student_temp=1.0).forward_masked(
        torch.tensor(student),
        torch.tensor(teacher),
        masks_weight=torch.tensor([1.0, 0.5, 0.5]),
        n_images=3,
    )
    # Student distributions: [1/2, 1/2], [3/4, 1/4], [1/4, 3/4].
    ce_a = math.log(2.0)
    ce_b1 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    ce_b2 = -math.log(0.75)
    expected = (ce_a + 0.5 * ce_b1 + 0.5 * ce_b2) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_koleo_on_hand_placed_vectors() -> None:
    # Directions 0, 60 and 180 degrees (norms differ, the loss normalises). Nearest neighbours:
    # 0 <-> 60 at chord 2 sin(30) = 1; 180 -> 60 at chord 2 sin(60) = sqrt(3).
    angles = [0.0, math.pi / 3, math.pi]
    norms = [2.0, 0.5, 3.0]
    x = torch.tensor(
        [[r * math.cos(a), r * math.sin(a)] for r, a in zip(norms, angles, strict=True)]
    )
    expected = -(math.log(1.0) + math.log(1.0) + math.log(math.sqrt(3.0))) / 3
    assert KoLeoLoss()(x).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_pushes_identical_rows_apart_as_dinov2() -> None:
    # Four copies of (1, 0, 0). DINOv2's distance ||f - f_nn + eps|| is eps * sqrt(3) for each, so
    # the loss is -log(eps * (sqrt(3) + 1)). Nearest-neighbour ties go to the lowest index: row 0
    # -> 1, rows 1, 2, 3 -> 0. With u = (1, 1, 1) / sqrt(3) and g = u / (4 eps (sqrt(3) + 1)),
    # row 0 gets -g (own term) + 3g (as the others' neighbour), row 1 gets g - g, rows 2 and 3
    # -g; the normalisation keeps only the part orthogonal to (1, 0, 0).
    eps = 1e-8
    x = torch.tensor([[1.0, 0.0, 0.0]] * 4, requires_grad=True)
    loss = KoLeoLoss()(x, eps=eps)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(eps * (math.sqrt(3) + 1)), rel=1e-6)
    c = 1 / (4 * eps * (math.sqrt(3) + 1) * math.sqrt(3))  # about 1.06e7
    expected = torch.tensor([[0, 2 * c, 2 * c], [0, 0, 0], [0, -c, -c], [0, -c, -c]])
    torch.testing.assert_close(x.grad, expected.float(), rtol=1e-4, atol=1e-3)
    # One gradient-descent step separates the copies: rows 0 and 2 are no longer identical.
    with torch.no_grad():
        stepped = x - 1e-9 * x.grad
    assert not torch.equal(stepped[0], stepped[2])


def test_koleo_duplicates_among_distinct_rows_on_hand_values() -> None:
    # Rows 0 and 1 are copies (distance eps * sqrt(2)); row 2 is orthogonal, its neighbour row 0
    # (tie with row 1, lowest index wins) at distance about sqrt(2).
    eps = 1e-8
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = KoLeoLoss()(x, eps=eps)
    loss.backward()
    copy_term = math.log(eps * (math.sqrt(2) + 1))
    assert loss.item() == pytest.approx(-(2 * copy_term + math.log(math.sqrt(2))) / 3, rel=1e-6)
    assert torch.isfinite(x.grad).all()
    # Row 2 is nobody's neighbour: only its own term, -log|f2 - f0|/3, moves it, along the
    # sphere away from row 0: d/df2 = -(f2 - f0) / (3 |f2 - f0|^2) = (1/6, -1/6), and the
    # normalisation keeps the component orthogonal to f2 = (0, 1).
    torch.testing.assert_close(x.grad[2], torch.tensor([1 / 6, 0.0]), rtol=1e-5, atol=1e-6)


def test_koleo_single_row_is_zero_with_a_graph() -> None:
    x = torch.tensor([[0.3, -0.4]], requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros(1, 2))


def test_koleo_runs_in_float32_under_autocast() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-6)


def _two_rank_worker(rank: int, store_path: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        # Rank 0 holds 1 row, rank 1 holds 2: the centre must be the mean over all 3 rows.
        rows = [[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]]][rank]
        dino = DinoClsLoss(out_dim=2, center_momentum=0.9)
        dino.update_center(torch.tensor(rows))
        assert dino.center[0].tolist() == pytest.approx([0.3, 0.4], abs=1e-6)

        # The 2x2 hand case split one sample per rank gives each rank its row of the result.
        own_logits = torch.tensor([_TWO_BY_TWO_LOGITS[rank]])
        probs = dino.sinkhorn_knopp_teacher(own_logits, teacher_temp=1.0, n_iterations=1)
        assert probs[0].tolist() == pytest.approx(_TWO_BY_TWO_ONE_ITERATION[rank], rel=1e-5)

        # iBOT: rank 0 also carries a padding row; the global count is 2.
        padded = torch.tensor([_TWO_BY_TWO_LOGITS[rank], [50.0, 0.0]])
        ibot_probs = IBotPatchLoss(patch_out_dim=2).sinkhorn_knopp_teacher(
            padded if rank == 0 else own_logits,
            teacher_temp=1.0,
            n_masked_patches_tensor=torch.tensor([1]),
            n_iterations=1,
        )
        assert ibot_probs[0].tolist() == pytest.approx(_TWO_BY_TWO_ONE_ITERATION[rank], rel=1e-5)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_teacher_statistics_use_the_global_batch_across_processes(tmp_path) -> None:
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


def test_row_weights_scale_each_row_before_the_batch_mean() -> None:
    students = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    teachers = [torch.tensor([[0.7, 0.3], [0.4, 0.6]])]
    loss_fn = DinoClsLoss(out_dim=2, student_temp=1.0)
    weighted = loss_fn(students, teachers, [[torch.tensor([1.0, 0.25])]])
    first = _manual_cross_entropy([1.0, 0.0], [0.7, 0.3], 1.0)
    second = _manual_cross_entropy([0.0, 1.0], [0.4, 0.6], 1.0)
    assert weighted.item() == pytest.approx((first + 0.25 * second) / 2, rel=1e-6)
