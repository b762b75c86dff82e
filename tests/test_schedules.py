import math

import pytest

from rsdino.ssl.schedule_config import OptimConfig, TeacherConfig
from rsdino.ssl.schedules import CosineScheduler, Schedules, build_schedules, scaled_lr


def test_cosine_scheduler_warmup_then_cosine() -> None:
    # 5 warmup values 0, 0.25, 0.5, 0.75, 1 (np.linspace), then 10 cosine values from 1 to 0.1.
    schedule = CosineScheduler(
        base_value=1.0, final_value=0.1, total_iters=15, warmup_iters=5, start_warmup_value=0.0
    )
    assert schedule[0] == 0.0
    assert schedule[2] == pytest.approx(0.5)
    assert schedule[4] == 1.0
    assert schedule[5] == 1.0
    # Halfway through the cosine (step 5 of 10) the value is the midpoint of base and final.
    assert schedule[10] == pytest.approx(0.55)
    # The last index is step 9 of 10: not yet final, as in DINOv2.
    assert schedule[14] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert schedule[15] == 0.1
    assert schedule[10**7] == 0.1


def test_cosine_scheduler_freeze_zeros_come_first() -> None:
    schedule = CosineScheduler(
        base_value=2.0,
        final_value=0.0,
        total_iters=8,
        warmup_iters=3,
        start_warmup_value=1.0,
        freeze_iters=2,
    )
    assert [schedule[i] for i in range(5)] == [0.0, 0.0, 1.0, 1.5, 2.0]
    # Cosine over 3 steps: 2 * 0.5 * (1 + cos(pi * j / 3)) for j = 0, 1, 2.
    assert [schedule[i] for i in range(5, 8)] == pytest.approx([2.0, 1.5, 0.5])


def test_cosine_scheduler_without_warmup_starts_at_base() -> None:
    schedule = CosineScheduler(base_value=0.04, final_value=0.4, total_iters=4)
    assert schedule[0] == 0.04
    assert schedule[2] == pytest.approx(0.22)


def test_cosine_scheduler_validates_lengths() -> None:
    with pytest.raises(ValueError, match="exceed"):
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)
    with pytest.raises(ValueError):
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=-1)
    with pytest.raises(IndexError):
        CosineScheduler(1.0, 0.0, total_iters=5)[-1]


def _schedules(epoch_length: int = 2, **overrides: float) -> Schedules:
    """Schedules of a 10-epoch run at lr 1 (scaling rule none), with ``overrides`` of either
    section's keys."""
    optim = {"base_lr": 1.0, "min_lr": 0.0, "epochs": 10, "warmup_epochs": 2}
    optim |= {"scaling_rule": "none", "freeze_last_layer_epochs": 1}
    teacher = {"warmup_teacher_temp_epochs": 3}
    for key, value in overrides.items():
        (optim if hasattr(OptimConfig, key) else teacher)[key] = value
    return build_schedules(
        OptimConfig(**optim), TeacherConfig(**teacher), epoch_length=epoch_length, global_batch=8
    )


def test_build_schedules_teacher_temp_warms_up_then_stays() -> None:
    schedules = _schedules()
    # 3 epochs * 2 = 6 warmup iterations from 0.04 to 0.07, 0.006 apart.
    assert schedules.teacher_temp[0] == 0.04
    assert schedules.teacher_temp[2] == pytest.approx(0.052)
    assert schedules.teacher_temp[5] == 0.07
    assert schedules.teacher_temp[6] == 0.07
    assert schedules.teacher_temp[19] == 0.07


def test_build_schedules_lr_wd_momentum() -> None:
    schedules = _schedules()
    # lr: 4 warmup iterations 0, 1/3, 2/3, 1, then cosine over 16 iterations.
    assert schedules.lr[0] == 0.0
    assert schedules.lr[1] == pytest.approx(1 / 3)
    assert schedules.lr[3] == 1.0
    assert schedules.lr[12] == pytest.approx(0.5)
    assert schedules.lr[20] == 0.0
    # wd and momentum: cosine over all 20 iterations, no warmup.
    assert schedules.wd[0] == 0.04
    assert schedules.wd[10] == pytest.approx(0.22)
    assert schedules.momentum[0] == 0.992
    assert schedules.momentum[10] == pytest.approx(0.996)
    assert schedules.momentum[20] == 1.0


def test_build_schedules_last_layer_lr_is_zero_while_frozen() -> None:
    schedules = _schedules(freeze_last_layer_epochs=1.5)  # 3 iterations
    assert [schedules.last_layer_lr[i] for i in range(3)] == [0.0, 0.0, 0.0]
    # Afterwards it is the lr schedule, not delayed: the warmup's last value at index 3.
    assert schedules.last_layer_lr[3] == 1.0
    assert schedules.last_layer_lr[12] == pytest.approx(0.5)


def test_build_schedules_rounds_fractional_epochs() -> None:
    schedules = _schedules(warmup_epochs=0.75, epoch_length=4)  # 3 warmup iterations
    assert [schedules.lr[i] for i in range(3)] == [0.0, 0.5, 1.0]


def test_scaled_lr_rules() -> None:
    assert scaled_lr(0.004, 256, "sqrt_wrt_1024") == pytest.approx(0.002)
    assert scaled_lr(0.004, 512, "linear_wrt_256") == pytest.approx(0.008)
    assert scaled_lr(0.004, 512, "none") == 0.004
    with pytest.raises(ValueError, match="sqrt_wrt_1024"):
        scaled_lr(0.004, 512, "cubic")


def test_build_schedules_scales_the_peak_lr_with_the_global_batch() -> None:
    optim = OptimConfig(base_lr=0.004, min_lr=0.0, epochs=2, warmup_epochs=1)
    schedules = build_schedules(optim, TeacherConfig(), epoch_length=3, global_batch=256)
    # sqrt_wrt_1024: 0.004 * sqrt(256 / 1024); the warmup (3 iterations) ends at the peak.
    assert schedules.lr[2] == pytest.approx(0.002)
    # freeze_last_layer_epochs=1 by default: the first 3 iterations, then the lr schedule.
    assert schedules.last_layer_lr[2] == 0.0
    assert schedules.last_layer_lr[3] == schedules.lr[3]
