"""Per-iteration schedules of DINOv2 (lr, weight decay, teacher momentum and temperature)."""

import math
from dataclasses import dataclass

from rsdino.ssl.schedule_config import LR_SCALING_RULES, OptimConfig, TeacherConfig


class CosineScheduler:
    """DINOv2's schedule: ``freeze_iters`` zeros, a linear warmup, then a cosine decay.

    The warmup runs from ``start_warmup_value`` to ``base_value`` with both ends included (like
    ``np.linspace``); the cosine then starts again at ``base_value`` and approaches
    ``final_value`` without reaching it inside the schedule; any index ``>= total_iters`` gives
    ``final_value``. Values are computed per index, so a schedule of 10^6 iterations costs nothing.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ValueError("total_iters, warmup_iters and freeze_iters must be >= 0")
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed "
                f"total_iters ({total_iters})"
            )
        self.base_value = base_value
        self.final_value = final_value
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.start_warmup_value = start_warmup_value
        self.freeze_iters = freeze_iters

    def __getitem__(self, it: int) -> float:
        if it < 0:
            raise IndexError(f"schedule index must be >= 0, got {it}")
        if it >= self.total_iters:
            return self.final_value
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            if self.warmup_iters == 1:
                return self.start_warmup_value
            fraction = it / (self.warmup_iters - 1)
            # Weighted forms (here and below) make the ends exact: the last warmup value *is* base.
            return (1 - fraction) * self.start_warmup_value + fraction * self.base_value
        it -= self.warmup_iters
        cosine_iters = self.total_iters - self.freeze_iters - self.warmup_iters
        weight = 0.5 * (1 + math.cos(math.pi * it / cosine_iters))
        return weight * self.base_value + (1 - weight) * self.final_value


class FrozenStartCosineScheduler(CosineScheduler):
    """A cosine schedule whose first ``frozen_iters`` values are 0 instead of their own.

    DINOv2 freezes the head's last layer this way: unlike ``freeze_iters``, which delays the whole
    schedule, the warmup stays where it was and is simply overwritten at the start.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        frozen_iters: int = 0,
    ) -> None:
        super().__init__(base_value, final_value, total_iters, warmup_iters, start_warmup_value)
        if frozen_iters < 0:
            raise ValueError(f"frozen_iters must be >= 0, got {frozen_iters}")
        self.frozen_iters = frozen_iters

    def __getitem__(self, it: int) -> float:
        if 0 <= it < min(self.frozen_iters, self.total_iters):
            return 0.0
        return super().__getitem__(it)


@dataclass(frozen=True)
class Schedules:
    """Everything the training loop looks up once per iteration."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler


def scaled_lr(base_lr: float, global_batch_size: int, rule: str) -> float:
    """Scale the learning rate with the global batch size (DINOv2 uses ``sqrt_wrt_1024``)."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024)
    if rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; accepted: {', '.join(LR_SCALING_RULES)}")


def build_schedules(
    optim: OptimConfig, teacher: TeacherConfig, *, epoch_length: int, global_batch: int
) -> Schedules:
    """DINOv2's schedules; epoch quantities become iterations via ``epoch_length``, and the lr
    scaling rule sees the ``global_batch`` (per-GPU batch x ranks).

    The teacher temperature warms up linearly and then stays at ``teacher_temp`` (its schedule ends
    with the warmup, so later indices return the final value).
    """

    def to_iters(n_epochs: float) -> int:
        return round(n_epochs * epoch_length)

    lr = scaled_lr(optim.base_lr, global_batch, optim.scaling_rule)
    min_lr = optim.min_lr
    total_iters = to_iters(optim.epochs)
    warmup_iters = to_iters(optim.warmup_epochs)
    temp_warmup_iters = to_iters(teacher.warmup_teacher_temp_epochs)
    frozen_iters = to_iters(optim.freeze_last_layer_epochs)
    return Schedules(
        lr=CosineScheduler(lr, min_lr, total_iters, warmup_iters),
        wd=CosineScheduler(optim.weight_decay, optim.weight_decay_end, total_iters),
        momentum=CosineScheduler(
            teacher.momentum_teacher, teacher.final_momentum_teacher, total_iters
        ),
        teacher_temp=CosineScheduler(
            teacher.teacher_temp,
            teacher.teacher_temp,
            temp_warmup_iters,
            warmup_iters=temp_warmup_iters,
            start_warmup_value=teacher.warmup_teacher_temp,
        ),
        last_layer_lr=FrozenStartCosineScheduler(
            lr, min_lr, total_iters, warmup_iters, frozen_iters=frozen_iters
        ),
    )
