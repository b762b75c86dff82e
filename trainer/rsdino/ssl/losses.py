"""DINOv2's self-distillation losses: DINO on [CLS] tokens, iBOT on masked patches, KoLeo.

The teacher side (centering or Sinkhorn-Knopp) turns teacher logits into target distributions; the
student side is a cross-entropy against those targets. Everything that needs batch statistics
reduces across processes when a process group is running and works alone otherwise.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _is_distributed() else 1


def _all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place over all processes (a no-op on a single process)."""
    if _is_distributed():
        dist.all_reduce(tensor)
    return tensor


def _student_log_probs(student_logits: Tensor, temp: float) -> Tensor:
    """Log-softmax of the student logits at ``temp``, in float32.

    Float32 so low-precision logits do not lose the small log-probabilities; a separate step so a
    student crop paired with several teacher crops pays for it once.
    """
    return F.log_softmax(student_logits.float() / temp, dim=-1)


def _rowwise_cross_entropy(student_log_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Cross-entropy of each row's student distribution against the teacher's, shape ``[rows]``."""
    return -(teacher_probs.float() * student_log_probs).sum(dim=-1)


@torch.no_grad()
def _sinkhorn_knopp(scores: Tensor, n_iterations: int, global_batch: Tensor | int) -> Tensor:
    """Balance positive ``scores`` ``[K, B_local]`` into soft assignments ``[B_local, K]``.

    Alternates two normalisations of the global ``[K, B]`` matrix (columns held across processes):
    every prototype row gets total mass ``1/K`` (equipartition, so no prototype collapses), then
    every sample column gets mass ``1/B``. Ending on the column step and multiplying by ``B`` makes
    each sample's row a probability distribution; the prototype marginals are then only
    approximately uniform, closer with more iterations. All-zero columns (padding) stay zero.
    """
    n_prototypes = scores.shape[0]
    q = scores / _all_reduce_sum_(scores.sum())
    for _ in range(n_iterations):
        q /= _all_reduce_sum_(q.sum(dim=1, keepdim=True))
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
        q /= global_batch
    q *= global_batch
    return q.t()


class _CenteredTeacher(nn.Module):
    """Shared teacher-side state: the EMA centre of teacher logits and the student temperature."""

    center: Tensor

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher targets ``softmax((t - center) / teacher_temp)``; centring avoids collapse."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """``center = m * center + (1 - m) * mean`` of the teacher logits over the global batch.

        Sum and row count are reduced together, so processes may contribute different numbers of
        rows (as they do for masked patches).
        """
        rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(self.center.dtype)
        sum_and_count = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        _all_reduce_sum_(sum_and_count)
        batch_mean = sum_and_count[:-1] / sum_and_count[-1]
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)


class DinoClsLoss(_CenteredTeacher):
    """DINO loss on the [CLS] prototype scores of student crops against teacher crops."""

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> Tensor:
        """Teacher targets by Sinkhorn-Knopp over the global batch (every process has B rows).

        ``exp`` is taken without a max shift, as in DINOv2: the head's logits are cosine
        similarities, so ``exp(logit / teacher_temp)`` stays well inside float32 range.
        """
        scores = torch.exp(teacher_logits.float() / teacher_temp).t()
        global_batch = scores.shape[1] * _world_size()
        return _sinkhorn_knopp(scores, n_iterations, global_batch)

    def forward(
        self,
        student_logits: list[Tensor],
        teacher_probs: list[Tensor],
        row_weights: list[list[Tensor]] | None = None,
    ) -> Tensor:
        """Sum over every (student, teacher) pair of the batch-mean cross-entropy.

        Callers choose the pairing by what they put in the lists (e.g. local crops vs both global
        teacher crops); normalising by the number of terms is :func:`normalise_dino_losses`' job.
        ``row_weights[i][j]`` scales the rows of pair (i, j) before the mean (e.g. cloudy views).
        """
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        for i, student in enumerate(student_logits):
            log_probs = _student_log_probs(student, self.student_temp)
            for j, teacher in enumerate(teacher_probs):
                rows = _rowwise_cross_entropy(log_probs, teacher)
                if row_weights is not None:
                    rows = rows * row_weights[i][j].to(rows)
                total = total + rows.mean()
        return total


class IBotPatchLoss(_CenteredTeacher):
    """iBOT loss: the student predicts the teacher's prototype scores at masked patches."""

    def __init__(
        self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__(patch_out_dim, student_temp, center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_logits: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Tensor,
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp targets for the masked patches ``[M, K]``.

        Only the first ``n_masked_patches_tensor`` rows count; any rows after them (padding, e.g. a
        fixed-size buffer) come back as zeros. Processes hold different numbers of masked
        patches, so the global batch is the all-reduced count (the caller's tensor is not changed).
        Keeping the count a tensor avoids a host-device sync.
        """
        n_local = n_masked_patches_tensor.reshape(()).to(teacher_logits.device)
        row_index = torch.arange(teacher_logits.shape[0], device=teacher_logits.device)
        counted = (row_index < n_local).unsqueeze(1)
        # ``where``, not a product: padding may hold anything, and inf * 0 would be NaN.
        scores = torch.where(counted, torch.exp(teacher_logits.float() / teacher_temp), 0.0).t()
        global_batch = _all_reduce_sum_(n_local.float().clone())
        return _sinkhorn_knopp(scores, n_iterations, global_batch)

    def forward_masked(
        self,
        student_patch_logits: Tensor,
        teacher_patch_probs: Tensor,
        masks_weight: Tensor,
        n_images: int,
    ) -> Tensor:
        """Weighted cross-entropy over masked patches ``[M, K]``, averaged over images.

        ``masks_weight[i]`` is ``1 / (masked patches in row i's image)``, so each masked image
        contributes its mean patch loss; dividing by ``n_images`` (all global-crop images, masked or
        not) gives DINOv2's per-image average.
        """
        log_probs = _student_log_probs(student_patch_logits, self.student_temp)
        per_patch = _rowwise_cross_entropy(log_probs, teacher_patch_probs)
        return (per_patch * masks_weight.float()).sum() / n_images


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser: pushes each feature away from its nearest neighbour.

    Spreading the batch's [CLS] features uniformly over the sphere is DINOv2's guard against
    dimensional collapse.
    """

    def forward(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """``-mean(log(||f - f_nn + eps|| + eps))`` over the L2-normalised rows ``f`` of ``x``.

        DINOv2's formulation: ``eps`` is added to every coordinate of the difference (as
        ``nn.PairwiseDistance`` does) and to the distance, so identical rows have the finite
        distance ``eps * sqrt(D)``, a large loss and a gradient of order ``1 / eps`` that pushes
        them apart. (Two copies that are each other's nearest neighbour push each other equally
        and their gradients cancel; a third copy, or any row whose neighbour is a copy, breaks
        the tie.) Ties go to the lowest row index, as in DINOv2; the row itself is never its own
        neighbour. A single row has no neighbour: the loss is a zero that still belongs to the
        graph (zero gradients), where DINOv2 would add the constant ``-log(eps * sqrt(D) + eps)``.
        """
        if x.shape[0] < 2:
            return x.sum() * 0
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = F.normalize(x.float(), p=2, dim=-1, eps=eps)
            similarity = features @ features.t()
            is_self = torch.eye(features.shape[0], dtype=torch.bool, device=features.device)
            nearest = similarity.masked_fill(is_self, float("-inf")).argmax(dim=1)
            difference = features - features[nearest] + eps
            distance = torch.linalg.vector_norm(difference, dim=-1)
            return -torch.log(distance + eps).mean()


def dino_loss_terms(n_global_crops: int, n_local_crops: int) -> tuple[int, int]:
    """Number of (student crop, teacher crop) pairs: global crops skip their own view."""
    return (n_global_crops - 1) * n_global_crops, n_global_crops * n_local_crops


def normalise_dino_losses(
    global_loss: Tensor, local_loss: Tensor, *, n_global_crops: int, n_local_crops: int
) -> tuple[Tensor, Tensor]:
    """Scale the raw DINO losses to a mean over all crop pairs, exactly as DINOv2 does.

    ``local_loss`` is :class:`DinoClsLoss` summed over every (local, global teacher) pair.
    ``global_loss`` is the mean over the (global student, other global teacher) pairs (with two
    crops, the batch mean over the stacked crops, each matched with the swapped teacher crop), so
    multiplying by their count gives their sum. Both sums are divided by the total pair count.
    """
    global_terms, local_terms = dino_loss_terms(n_global_crops, n_local_crops)
    total_terms = global_terms + local_terms
    return global_loss * global_terms / total_terms, local_loss / total_terms
