"""Exponential moving average of the student into the teacher (DINOv2's momentum encoder)."""

import torch
from torch import Tensor


def _local(tensor: Tensor) -> Tensor:
    """The process-local data of a sharded tensor (FSDP2 DTensor), or the tensor itself.

    The EMA is element-wise, so each process can update its own shard without communication.
    """
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


@torch.no_grad()
def update_teacher_ema(
    student_params: list[Tensor], teacher_params: list[Tensor], momentum: float
) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, in place, pairwise.

    Written as ``teacher += (1 - momentum) * (student - teacher)``, one fused ``_foreach_lerp_``
    over the whole model: one read of each tensor pair and one write, where multiply-then-add
    reads and writes the teacher twice.
    """
    if len(student_params) != len(teacher_params):
        raise ValueError(
            f"student has {len(student_params)} parameters but teacher has {len(teacher_params)}"
        )
    students = [_local(param) for param in student_params]
    teachers = [_local(param) for param in teacher_params]
    torch._foreach_lerp_(teachers, students, 1 - momentum)
