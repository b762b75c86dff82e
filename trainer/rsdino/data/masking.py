"""iBOT masks for the global crops: BEiT-style random blocks, stratified mask ratios."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_ATTEMPTS_PER_BLOCK = 10
# Uniforms drawn per refill of a UniformStream: an image of a 14x14 grid uses about 36.
_UNIFORM_CHUNK = 64


class UniformStream:
    """The floats successive ``torch.rand(k, generator=generator)`` calls return, as Python
    floats drawn a chunk at a time: CPU ``torch.rand`` consumes the generator one value per
    element in order, so chunking changes the call count, not the values."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.values: list[float] = []
        self.position = 0

    def take(self, count: int) -> list[float]:
        """The next ``count`` uniforms in [0, 1)."""
        while self.position + count > len(self.values):
            self.values = self.values[self.position :]
            self.values += torch.rand(_UNIFORM_CHUNK, generator=self.generator).tolist()
            self.position = 0
        taken = self.values[self.position : self.position + count]
        self.position += count
        return taken


def dinov2_max_num_patches(grid_size: tuple[int, int]) -> int:
    """The largest block DINOv2 trains with: half the grid, rounded as its training script does.

    DINOv2 evaluates ``0.5 * img_size // patch_size * img_size // patch_size`` left to right,
    which is ``(side // 2) * side`` patches: 21 on a 7x7 grid, where ``0.5 * 49`` would give 24.
    Here the first (height) factor is halved, so non-square grids follow the same rounding.
    """
    height, width = grid_size
    return (height // 2) * width


class BlockMaskGenerator:
    """Masks patches of a grid by stacking random rectangles (BEiT's block-wise masking).

    Blocks rather than scattered patches make masked-patch prediction need context from further
    away. Each rectangle has an area uniform in [min_num_patches, remaining budget capped at
    max_num_patches] and a log-uniform aspect ratio; as in DINOv2 it must be strictly smaller
    than the grid on both sides (``h < H``, ``w < W``) and is kept only if it masks at least one
    new patch without overshooting the target. Placement stops when the target is reached or
    when a round of attempts adds nothing, so the count can fall slightly short of the target;
    a grid one patch high or wide has room for no block and is never masked.
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        max_num_patches: int | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = grid_size
        if height < 1 or width < 1:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        if max_num_patches is None:
            max_num_patches = dinov2_max_num_patches(grid_size)
        # min may exceed max on tiny grids: areas are then drawn from the reversed interval.
        if min_num_patches < 1 or max_num_patches < 0:
            raise ValueError(
                "need min_num_patches >= 1 and max_num_patches >= 0, "
                f"got {min_num_patches} and {max_num_patches}"
            )
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect
        if not 0.0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.height = height
        self.width = width
        self.max_num_patches = max_num_patches
        self.min_num_patches = min_num_patches
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))

    def __call__(self, num_masking_patches: int, generator: torch.Generator) -> torch.Tensor:
        """A bool [height, width] mask with at most `num_masking_patches` True entries.

        Draws come from ``generator`` in chunks (see `UniformStream`), so the generator ends
        past the draws the mask used; the mask is the one successive 4-draw attempts give.
        """
        mask = np.zeros((self.height, self.width), dtype=bool)
        self.fill(mask, num_masking_patches, UniformStream(generator))
        return torch.from_numpy(mask)

    def fill(self, mask: np.ndarray, num_masking_patches: int, uniforms: UniformStream) -> None:
        """Stack blocks on an empty bool [height, width] array, in place.

        Numpy and Python floats rather than torch: a mask takes a few dozen tiny steps, where
        torch's per-op overhead dominated the step's mask building.
        """
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, uniforms)
            if added == 0:
                break
            count += added

    def add_block(
        self, mask: torch.Tensor | np.ndarray, budget: int, generator: torch.Generator
    ) -> int:
        """Try to mask one rectangle adding 1..budget new patches; return how many it added."""
        return self._add_block(np.asarray(mask), budget, UniformStream(generator))

    def _add_block(self, mask: np.ndarray, budget: int, uniforms: UniformStream) -> int:
        for _ in range(_ATTEMPTS_PER_BLOCK):
            added = self.place_block(mask, budget, *uniforms.take(4))
            if added:
                return added
        return 0

    def block_shape(self, budget: int, u_area: float, u_aspect: float) -> tuple[int, int]:
        """Height and width of the rectangle that two uniform draws in [0, 1) describe."""
        # When the budget is below min_num_patches the interval is reversed, as in BEiT.
        area = self.min_num_patches + u_area * (budget - self.min_num_patches)
        low, high = self.log_aspect_range
        aspect = math.exp(low + u_aspect * (high - low))
        return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))

    def place_block(
        self,
        mask: torch.Tensor | np.ndarray,
        budget: int,
        u_area: float,
        u_aspect: float,
        u_top: float,
        u_left: float,
    ) -> int:
        """Mask the rectangle four uniform draws describe, if it fits; return the patches added."""
        block_height, block_width = self.block_shape(budget, u_area, u_aspect)
        if not (1 <= block_height < self.height and 1 <= block_width < self.width):
            return 0
        top = int(u_top * (self.height - block_height + 1))
        left = int(u_left * (self.width - block_width + 1))
        block = np.asarray(mask)[top : top + block_height, left : left + block_width]
        added = block.size - int(np.count_nonzero(block))
        if not 0 < added <= budget:
            return 0
        block[...] = True
        return added


@dataclass
class IBotMasks:
    """Masks of a batch of global crops, plus the flat views the iBOT loss consumes."""

    masks: torch.Tensor  # bool [n_images, N]
    mask_indices: torch.Tensor  # long [M]: positions of True in masks.flatten()
    masks_weight: torch.Tensor  # float [M]: 1 / (number of masked patches of that image)
    n_masked_patches: int  # M

    def to(self, device: torch.device) -> IBotMasks:
        return IBotMasks(
            masks=self.masks.to(device, non_blocking=True),
            mask_indices=self.mask_indices.to(device, non_blocking=True),
            masks_weight=self.masks_weight.to(device, non_blocking=True),
            n_masked_patches=self.n_masked_patches,
        )


def sample_ibot_masks(
    n_images: int,
    grid_size: tuple[int, int],
    mask_ratio_min_max: tuple[float, float],
    mask_sample_probability: float,
    generator: torch.Generator,
    rows: Tensor | None = None,
) -> IBotMasks:
    """Mask int(n_images * p) of the images, with ratios stratified over [min, max].

    Stratifying (image i draws its ratio inside the i-th of equal sub-intervals) spreads the mask
    ratios evenly across the batch instead of leaving it to chance; the images are then shuffled
    so that which ones are masked is random. ``rows`` selects which images of the batch to build
    (default: all): the batch-level draws are made for all ``n_images`` and each image's blocks
    come from its own seed, so one rank builds only its share of a global batch, and gets the
    same masks a single process building the whole batch would.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    low, high = mask_ratio_min_max
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {(low, high)}")
    if not 0.0 <= mask_sample_probability <= 1.0:
        raise ValueError(
            f"mask_sample_probability must be in [0, 1], got {mask_sample_probability}"
        )
    num_patches = grid_size[0] * grid_size[1]
    block_masker = BlockMaskGenerator(grid_size)
    n_masked_images = int(n_images * mask_sample_probability)
    strata = torch.linspace(low, high, n_masked_images + 1)
    ratios = strata[:-1] + torch.rand(n_masked_images, generator=generator) * strata.diff()
    targets = [int(num_patches * ratio) for ratio in ratios.tolist()]
    seeds = torch.randint(2**62, (n_masked_images,), generator=generator).tolist()
    order = torch.randperm(n_images, generator=generator)
    selected = (order if rows is None else order[rows]).tolist()
    masks = np.zeros((len(selected), *grid_size), dtype=bool)
    for row, image in enumerate(selected):  # image < n_masked_images: that stratum's mask
        if image < n_masked_images:
            own = torch.Generator().manual_seed(seeds[image])
            block_masker.fill(masks[row], targets[image], UniformStream(own))
    return masks_from_flat(torch.from_numpy(masks).flatten(1))


def masks_from_flat(flat_masks: Tensor) -> IBotMasks:
    """Indices and per-patch weights of bool masks [n_images, N]."""
    mask_indices = flat_masks.flatten().nonzero().flatten()
    per_image_weight = 1.0 / flat_masks.sum(dim=1).clamp(min=1).float()
    masks_weight = per_image_weight[:, None].expand_as(flat_masks)[flat_masks]
    return IBotMasks(
        masks=flat_masks,
        mask_indices=mask_indices,
        masks_weight=masks_weight,
        n_masked_patches=int(mask_indices.numel()),
    )
