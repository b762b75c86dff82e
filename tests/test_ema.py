import pytest
import torch

from rsdino.ssl.ema import update_teacher_ema


def test_ema_update_with_momentum_point_nine() -> None:
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0]])]
    student = [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])]
    update_teacher_ema(student, teacher, momentum=0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2; 0.9 * 2 + 0.1 * -2 = 1.6; 0.9 * 10 = 9
    assert teacher[0].tolist() == pytest.approx([1.2, 1.6])
    assert teacher[1].item() == pytest.approx(9.0)
    assert student[0].tolist() == [3.0, -2.0]


def test_ema_updates_parameters_in_place_without_grad() -> None:
    teacher = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    student = torch.nn.Parameter(torch.ones(3))
    update_teacher_ema([student], [teacher], momentum=0.75)
    assert teacher.tolist() == [0.25, 0.25, 0.25]
    assert student.grad is None


def test_ema_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="teacher has 2"):
        update_teacher_ema([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], momentum=0.9)


def test_ema_matches_the_momentum_formula_on_many_tensors() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = [torch.randn(64, 33, generator=generator) for _ in range(3)]
    student = [torch.randn(64, 33, generator=generator) for _ in range(3)]
    expected = [
        0.996 * t.double() + 0.004 * s.double() for t, s in zip(teacher, student, strict=True)
    ]
    update_teacher_ema(student, teacher, momentum=0.996)
    for got, want in zip(teacher, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
