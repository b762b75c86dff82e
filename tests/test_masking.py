"""iBOT block masks: counts per stratum, weights, flat indices, determinism."""

from __future__ import annotations

import pytest
import torch

from rsdino.data.masking import BlockMaskGenerator, dinov2_max_num_patches, sample_ibot_masks

GRID = (8, 8)
NUM_PATCHES = 64


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("n_images", "probability"), [(8, 0.5), (10, 0.25), (7, 1.0), (3, 0.3)])
def test_number_of_masked_images(n_images: int, probability: float) -> None:
    masks = sample_ibot_masks(n_images, GRID, (0.1, 0.5), probability, generator())
    assert masks.masks.shape == (n_images, NUM_PATCHES) and masks.masks.dtype == torch.bool
    assert int(masks.masks.any(dim=1).sum()) == int(n_images * probability)


def test_masked_counts_fall_in_their_strata() -> None:
    n_images, low, high = 16, 0.1, 0.5
    for seed in range(5):
        masks = sample_ibot_masks(n_images, GRID, (low, high), 0.5, generator(seed))
        counts = sorted(c for c in masks.masks.sum(dim=1).tolist() if c > 0)
        assert len(counts) == 8
        # Image i of the 8 masked ones draws its ratio in [low + i*0.05, low + (i+1)*0.05]. The
        # images are shuffled, but since every count is bounded by its own stratum, the i-th
        # smallest count is bounded by the i-th stratum too.
        for i, count in enumerate(counts):
            lower_target = int(NUM_PATCHES * (low + i * 0.05))
            upper_target = int(NUM_PATCHES * (low + (i + 1) * 0.05))
            assert count <= upper_target
            # Block placement never overshoots but may stop a few patches short: the last
            # rectangles must add between 1 and the remaining budget of new patches and can fail
            # ten attempts in a row. On an 8x8 grid the shortfall is one or two patches.
            assert count >= 0.75 * lower_target


def test_weights_sum_to_one_per_masked_image_and_indices_match_masks() -> None:
    masks = sample_ibot_masks(12, GRID, (0.1, 0.5), 0.5, generator(3))
    expected_indices = [
        image * NUM_PATCHES + patch
        for image, row in enumerate(masks.masks.tolist())
        for patch, masked in enumerate(row)
        if masked
    ]
    assert masks.mask_indices.dtype == torch.int64
    assert masks.mask_indices.tolist() == expected_indices
    assert masks.n_masked_patches == len(expected_indices)
    assert masks.masks_weight.shape == (len(expected_indices),)
    image_of_entry = masks.mask_indices // NUM_PATCHES
    per_image = torch.zeros(12).index_add_(0, image_of_entry, masks.masks_weight)
    masked_images = masks.masks.any(dim=1)
    torch.testing.assert_close(per_image[masked_images], torch.ones(6))
    assert (per_image[~masked_images] == 0).all()


def test_zero_probability_masks_nothing() -> None:
    masks = sample_ibot_masks(6, GRID, (0.1, 0.5), 0.0, generator())
    assert not masks.masks.any()
    assert masks.n_masked_patches == 0
    assert masks.mask_indices.numel() == 0 and masks.masks_weight.numel() == 0


def test_same_generator_state_gives_same_masks() -> None:
    first = sample_ibot_masks(10, GRID, (0.1, 0.5), 0.5, generator(9))
    second = sample_ibot_masks(10, GRID, (0.1, 0.5), 0.5, generator(9))
    other = sample_ibot_masks(10, GRID, (0.1, 0.5), 0.5, generator(10))
    assert torch.equal(first.masks, second.masks)
    assert not torch.equal(first.masks, other.masks)


def test_masked_images_are_shuffled() -> None:
    positions = set()
    for seed in range(10):
        masks = sample_ibot_masks(8, GRID, (0.1, 0.5), 0.5, generator(seed))
        positions.update(masks.masks.any(dim=1).nonzero().flatten().tolist())
    assert positions == set(range(8))


def test_block_generator_first_block_is_a_rectangle() -> None:
    # Aspect fixed to 1 and area fixed to 4 (min == budget): the only block is a 2x2 square.
    masker = BlockMaskGenerator(GRID, max_num_patches=4, min_num_patches=4, min_aspect=1.0)
    mask = masker(4, generator(1))
    rows, cols = mask.nonzero(as_tuple=True)
    assert int(mask.sum()) == 4
    assert rows.max() - rows.min() == 1 and cols.max() - cols.min() == 1


def test_block_generator_counts() -> None:
    masker = BlockMaskGenerator(GRID)
    assert masker.max_num_patches == 32
    assert not masker(0, generator()).any()
    for target in (5, 17, 30):
        count = int(masker(target, generator(target)).sum())
        assert target * 0.75 <= count <= target


@pytest.mark.parametrize(
    ("grid", "expected"),
    [((16, 16), 128), ((8, 8), 32), ((7, 7), 21), ((5, 5), 10), ((3, 3), 3), ((2, 2), 2),
     ((1, 1), 0), ((1, 5), 0), ((5, 8), 16)],
)  # fmt: skip
def test_max_num_patches_is_half_the_grid_rounded_as_dinov2(
    grid: tuple[int, int], expected: int
) -> None:
    # (side // 2) * side: a 7x7 grid allows 21 patches per block, not 0.5 * 49 = 24.
    assert dinov2_max_num_patches(grid) == expected
    assert BlockMaskGenerator(grid).max_num_patches == expected


@pytest.mark.parametrize("img_size", [224, 98, 70, 42, 28])
def test_max_num_patches_equals_dinov2_train_expression(img_size: int) -> None:
    patch = 14
    grid = (img_size // patch, img_size // patch)
    # DINOv2's train.py passes max_num_patches=0.5 * img_size // patch_size * img_size // patch_size
    assert dinov2_max_num_patches(grid) == int(0.5 * img_size // patch * img_size // patch)


def test_block_filling_a_whole_side_is_rejected() -> None:
    # Aspect fixed to 1: u_area = 0 gives area 4 (a 2x2 block), u_area = 1 gives 4 + 5 = 9 (3x3).
    square = BlockMaskGenerator((3, 3), max_num_patches=9, min_num_patches=4, min_aspect=1.0)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    assert square.place_block(mask, 9, u_area=1.0, u_aspect=0.5, u_top=0.0, u_left=0.0) == 0
    assert not mask.any()  # the 3x3 block spans the grid: DINOv2 wants h < H and w < W
    # top = int(0.99 * (3 - 2 + 1)) = 1, left = 0: rows 1-2, columns 0-1.
    assert square.place_block(mask, 9, u_area=0.0, u_aspect=0.5, u_top=0.99, u_left=0.0) == 4
    assert mask.tolist() == [[False] * 3, [True, True, False], [True, True, False]]

    # Area 3 at aspect 3 is a 3x1 column: too tall for 3 rows, fine for 4.
    for height, added in ((3, 0), (4, 3)):
        tall = BlockMaskGenerator((height, 3), max_num_patches=3, min_num_patches=3)
        assert tall.block_shape(3, u_area=0.0, u_aspect=1.0) == (3, 1)
        mask = torch.zeros(height, 3, dtype=torch.bool)
        assert tall.place_block(mask, 3, 0.0, 1.0, 0.0, 0.0) == added
        assert int(mask.sum()) == added


@pytest.mark.parametrize("grid", [(2, 2), (3, 3), (3, 5), (5, 4), (1, 4), (4, 1)])
def test_no_block_spans_a_side_on_small_and_odd_grids(grid: tuple[int, int]) -> None:
    height, width = grid
    masker = BlockMaskGenerator(grid, max_num_patches=height * width, min_num_patches=1)
    placed = 0
    for seed in range(200):
        mask = torch.zeros(grid, dtype=torch.bool)
        if masker.add_block(mask, height * width, generator(seed)) == 0:
            continue
        rows, cols = mask.nonzero(as_tuple=True)
        assert rows.max() - rows.min() + 1 < height and cols.max() - cols.min() + 1 < width
        placed += 1
    # A grid one patch high or wide has room for no block; the others do.
    assert (placed == 0) == (min(grid) == 1)


def test_grid_one_patch_high_is_never_masked() -> None:
    masks = sample_ibot_masks(4, (1, 6), (0.1, 0.5), 1.0, generator())
    assert masks.n_masked_patches == 0 and not masks.masks.any()


def test_invalid_settings_raise() -> None:
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        sample_ibot_masks(4, GRID, (0.6, 0.2), 0.5, generator())
    with pytest.raises(ValueError, match="mask_sample_probability"):
        sample_ibot_masks(4, GRID, (0.1, 0.5), 1.5, generator())
    with pytest.raises(ValueError, match="grid_size"):
        BlockMaskGenerator((0, 4))
