"""Batched multi-crop: shapes, crop-major order, co-registration, geometry and photometry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import multicrop

from rsdino.data.augment import crop_affine, gaussian_blur, sample_crop_boxes
from rsdino.data.batch_share import BatchShare

NO_PHOTOMETRY = {
    "brightness": 0.0,
    "contrast": 0.0,
    "band_jitter": 0.0,
    "blur_prob_global": (0.0, 0.0),
    "blur_prob_local": 0.0,
}
WHOLE_IMAGE = {"global_crops_scale": (1.0, 1.0), "ratio": (1.0, 1.0)}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coordinate_image(batch: int, channels: int, size: int) -> torch.Tensor:
    """Channel 0 holds the column index, channel 1 the row index, other channels a constant."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.ones(batch, channels, size, size)
    image[:, 0] = cols.float()
    image[:, 1] = rows.float()
    return image


def warp(image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", align_corners=False)


def test_output_shapes_and_crop_major_order() -> None:
    batch = 3
    # Each sample is constant and equal to its index, so every crop must equal its sample index.
    s2 = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 13, 24, 24)
    s1 = s2[:, :2].clone()
    augment = multicrop(16, 8, local_crops_number=2, **NO_PHOTOMETRY)
    out = augment({"s2": s2.contiguous(), "s1": s1}, generator())
    assert out["global_crops"]["s2"].shape == (2 * batch, 13, 16, 16)
    assert out["global_crops"]["s1"].shape == (2 * batch, 2, 16, 16)
    assert out["local_crops"]["s2"].shape == (2 * batch, 13, 8, 8)
    assert out["local_crops"]["s1"].shape == (2 * batch, 2, 8, 8)
    for crops in (*out["global_crops"].values(), *out["local_crops"].values()):
        expected = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]).view(-1, 1, 1, 1)
        torch.testing.assert_close(crops, expected.expand_as(crops))


def test_no_local_crops_gives_empty_tensors() -> None:
    augment = multicrop(8, 4, local_crops_number=0)
    out = augment({"s1": torch.randn(2, 2, 12, 12)}, generator())
    assert out["local_crops"]["s1"].shape == (0, 2, 4, 4)


def test_modalities_share_the_geometry_of_each_view() -> None:
    size = 20
    images = {"s2": coordinate_image(4, 13, size), "s1": coordinate_image(4, 2, size)}
    augment = multicrop(12, 6, local_crops_number=3, **NO_PHOTOMETRY)
    out = augment(images, generator(7))
    for group in ("global_crops", "local_crops"):
        s2_coords = out[group]["s2"][:, :2]
        torch.testing.assert_close(s2_coords, out[group]["s1"])
        # The views really differ, otherwise sharing would be trivial.
        assert not torch.allclose(s2_coords[0], s2_coords[4])


def test_whole_image_crop_without_flips_reproduces_the_image() -> None:
    images = torch.randn(2, 13, 16, 16, generator=generator(1))
    settings = {**WHOLE_IMAGE, **NO_PHOTOMETRY, "local_crops_scale": (1.0, 1.0)}
    augment = multicrop(16, 16, 1, flip_prob=0.0, rotate90=False, **settings)
    out = augment({"s2": images}, generator())
    torch.testing.assert_close(out["global_crops"]["s2"], torch.cat([images, images]))
    torch.testing.assert_close(out["local_crops"]["s2"], images)


def test_quarter_turn_and_flips_map_pixels_as_expected() -> None:
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    center, half_size = torch.zeros(1, 2), torch.ones(1, 2)
    no, yes = torch.tensor([False]), torch.tensor([True])

    def view(hflip: torch.Tensor, vflip: torch.Tensor, turns: int) -> list[list[float]]:
        theta = crop_affine(center, half_size, hflip, vflip, torch.tensor([turns]))
        return warp(image, theta)[0, 0].tolist()

    assert view(no, no, 0) == [[1.0, 2.0], [3.0, 4.0]]
    assert view(yes, no, 0) == [[2.0, 1.0], [4.0, 3.0]]
    assert view(no, yes, 0) == [[3.0, 4.0], [1.0, 2.0]]
    assert view(no, no, 1) == [[2.0, 4.0], [1.0, 3.0]]  # counter-clockwise, as torch.rot90
    assert view(no, no, 2) == [[4.0, 3.0], [2.0, 1.0]]


def test_crop_box_samples_its_own_pixels() -> None:
    # Right half of a 4x4 coordinate image, resized to 2x2: columns 2..3 -> x centres 2, 3.
    image = coordinate_image(1, 2, 4)
    theta = crop_affine(
        torch.tensor([[0.5, 0.0]]),
        torch.tensor([[0.5, 1.0]]),
        torch.tensor([False]),
        torch.tensor([False]),
        torch.tensor([0]),
    )
    grid = F.affine_grid(theta, [1, 2, 4, 2], align_corners=False)
    crop = F.grid_sample(image, grid, align_corners=False)
    assert crop[0, 0].tolist() == [[2.0, 3.0]] * 4
    assert crop[0, 1].tolist() == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


def test_random_rotations_are_exact_quarter_turns() -> None:
    images = torch.randn(8, 2, 10, 10, generator=generator(2))
    augment = multicrop(10, 10, 0, **WHOLE_IMAGE, flip_prob=0.0, **NO_PHOTOMETRY)
    crops = augment({"s1": images}, generator(3))["global_crops"]["s1"]
    turns_seen = set()
    for index, crop in enumerate(crops):
        source = images[index % 8]
        matches = [
            k
            for k in range(4)
            if torch.allclose(crop, torch.rot90(source, k, dims=(-2, -1)), atol=1e-5)
        ]
        assert len(matches) == 1
        turns_seen.update(matches)
    assert turns_seen == {0, 1, 2, 3}


def test_flip_probability_one_flips_both_axes() -> None:
    images = torch.randn(3, 13, 8, 8, generator=generator(4))
    augment = multicrop(8, 8, 0, **WHOLE_IMAGE, flip_prob=1.0, rotate90=False, **NO_PHOTOMETRY)
    crops = augment({"s2": images}, generator())["global_crops"]["s2"]
    torch.testing.assert_close(crops[:3], images.flip(-1).flip(-2))


def test_crop_boxes_respect_scale_ratio_and_image_bounds() -> None:
    height, width = 30, 60
    center, half_size = sample_crop_boxes(500, height, width, (0.1, 0.4), (0.5, 2.0), generator())
    # half_size is the fraction of the image width / height covered by the box.
    area_fraction = half_size[:, 0] * half_size[:, 1]
    pixel_ratio = (half_size[:, 0] * width) / (half_size[:, 1] * height)
    assert area_fraction.min() >= 0.1 - 1e-6 and area_fraction.max() <= 0.4 + 1e-6
    assert pixel_ratio.min() >= 0.5 - 1e-5 and pixel_ratio.max() <= 2.0 + 1e-5
    assert ((center.abs() + half_size) <= 1.0 + 1e-6).all()


def test_impossible_boxes_fall_back_to_the_largest_admissible_box() -> None:
    # A 10x40 image with square crops of the full area never fits: the fallback is a 10x10 box.
    center, half_size = sample_crop_boxes(4, 10, 40, (1.0, 1.0), (1.0, 1.0), generator())
    torch.testing.assert_close(half_size, torch.tensor([[0.25, 1.0]]).expand(4, 2))
    assert (center[:, 1] == 0).all()


def test_same_seed_same_crops_other_seed_other_crops() -> None:
    images = {"s2": torch.randn(2, 13, 16, 16, generator=generator(5))}
    augment = multicrop(12, 6, 2)
    first = augment(images, generator(11))
    second = augment(images, generator(11))
    third = augment(images, generator(12))
    for group in ("global_crops", "local_crops"):
        assert torch.equal(first[group]["s2"], second[group]["s2"])
        assert not torch.equal(first[group]["s2"], third[group]["s2"])


def test_brightness_shifts_each_image_by_one_constant() -> None:
    images = torch.randn(4, 13, 8, 8, generator=generator(6))
    photometry = {**NO_PHOTOMETRY, "brightness": 0.3}
    augment = multicrop(8, 8, 0, **WHOLE_IMAGE, flip_prob=0.0, rotate90=False, **photometry)
    shift = augment({"s2": images}, generator())["global_crops"]["s2"][:4] - images
    per_image = shift[:, :1, :1, :1]
    torch.testing.assert_close(shift, per_image.expand_as(shift))
    assert per_image.abs().max() <= 0.3 and per_image.abs().min() > 0


def test_contrast_keeps_each_band_mean() -> None:
    images = torch.randn(4, 2, 8, 8, generator=generator(8))
    photometry = {**NO_PHOTOMETRY, "contrast": 0.5}
    augment = multicrop(8, 8, 0, **WHOLE_IMAGE, flip_prob=0.0, rotate90=False, **photometry)
    crops = augment({"s1": images}, generator())["global_crops"]["s1"][:4]
    torch.testing.assert_close(crops.mean(dim=(-2, -1)), images.mean(dim=(-2, -1)))
    spread_ratio = crops.std(dim=(-2, -1)) / images.std(dim=(-2, -1))
    assert spread_ratio.min() >= 0.5 - 1e-5 and spread_ratio.max() <= 1.5 + 1e-5
    # One contrast factor per image, shared by its bands.
    torch.testing.assert_close(spread_ratio, spread_ratio[:, :1].expand_as(spread_ratio))


def test_gaussian_blur_matches_a_hand_computed_kernel() -> None:
    sigma = 1.0
    impulse = torch.zeros(2, 1, 9, 9)
    impulse[:, :, 4, 4] = 1.0
    # Image 0 gets sigma=1, image 1 a tiny sigma that leaves the impulse in place.
    out = gaussian_blur(impulse, torch.tensor([sigma, 1e-3]), radius=3)
    weights = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-3, 4)]
    total = sum(weights)
    assert out[0, 0, 4, 4].item() == pytest.approx((weights[3] / total) ** 2, rel=1e-5)
    assert out[0, 0, 4, 5].item() == pytest.approx(weights[3] * weights[4] / total**2, rel=1e-5)
    assert out[0, 0, 4, 8].item() == 0.0  # outside the radius
    assert out[0].sum().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(out[1], impulse[1])


def test_blur_probability_one_blurs_every_view_zero_none() -> None:
    images = torch.randn(3, 2, 12, 12, generator=generator(9))
    settings = {**NO_PHOTOMETRY, "blur_prob_global": (1.0, 0.0), "blur_sigma": (1.5, 2.0)}
    augment = multicrop(12, 12, 0, **WHOLE_IMAGE, flip_prob=0.0, rotate90=False, **settings)
    crops = augment({"s1": images}, generator())["global_crops"]["s1"]
    torch.testing.assert_close(crops[3:], images)
    # Blurring smooths: neighbouring-pixel differences shrink for every image of view 0.
    roughness = (crops[:3].diff(dim=-1).abs().mean(dim=(1, 2, 3))) / (
        images.diff(dim=-1).abs().mean(dim=(1, 2, 3))
    )
    assert (roughness < 0.7).all()


@pytest.mark.parametrize("channels", [13, 2])
def test_single_modality_of_any_band_count(channels: int) -> None:
    augment = multicrop(16, 8, 2)
    out = augment({"x": torch.randn(2, channels, 20, 20)}, generator())
    assert out["global_crops"]["x"].shape == (4, channels, 16, 16)
    assert out["local_crops"]["x"].shape == (4, channels, 8, 8)
    assert torch.isfinite(out["global_crops"]["x"]).all()


def test_invalid_inputs_and_settings_raise() -> None:
    augment = multicrop(8, 4, 1)
    with pytest.raises(ValueError, match="empty"):
        augment({}, generator())
    with pytest.raises(ValueError, match="height and width"):
        augment({"s2": torch.zeros(1, 13, 8, 8), "s1": torch.zeros(1, 2, 8, 9)}, generator())
    with pytest.raises(ValueError, match="float"):
        augment({"s2": torch.zeros(1, 13, 8, 8, dtype=torch.uint16)}, generator())
    with pytest.raises(ValueError, match="global_crops_scale"):
        multicrop(8, 4, 1, global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="local_crops_scale"):
        multicrop(8, 4, 1, local_crops_scale=(0.1, 1.5))
    with pytest.raises(ValueError, match=r"crops\.local_crops_scale=\[0\.0, 0\.3\] must be"):
        multicrop(8, 4, 1, local_crops_scale=(0.0, 0.3))
    with pytest.raises(ValueError, match="ratio"):
        multicrop(8, 4, 1, ratio=(0.0, 1.0))


def test_split_batch_draws_the_same_crops_as_the_whole_batch() -> None:
    """Two processes with half a batch each produce the crops one process makes for all of it."""
    augment = multicrop(global_crops_size=8, local_crops_size=4, local_crops_number=2)
    images = {"s2": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    whole = augment(images, torch.Generator().manual_seed(5))
    halves = [
        augment(
            {"s2": images["s2"][rank * 2 : rank * 2 + 2]},
            torch.Generator().manual_seed(5),
            BatchShare(2, rank, 2),
        )
        for rank in (0, 1)
    ]
    for kind, n_views in (("global_crops", 2), ("local_crops", 2)):
        expected = whole[kind]["s2"].view(n_views, 4, *whole[kind]["s2"].shape[1:])
        got = torch.stack(
            [half[kind]["s2"].view(n_views, 2, *half[kind]["s2"].shape[1:]) for half in halves],
            dim=1,
        ).flatten(1, 2)
        assert torch.allclose(expected, got, atol=1e-6)
