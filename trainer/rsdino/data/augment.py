"""Batched DINO multi-crop for co-registered multispectral / SAR images, on any device.

Each view of a sample is one affine map (crop box, flips, quarter turns) applied by a single
`grid_sample`, shared by all modalities so that optical and radar crops stay aligned. Photometric
changes work in normalised space and are drawn per modality, because the sensors are independent.
Randomness comes from one CPU generator: the same generator state gives the same crops anywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rsdino.data.augment_config import AugmentConfig, CropsConfig
from rsdino.data.batch_share import BatchShare

_CROP_ATTEMPTS = 10  # as RandomResizedCrop: tries before falling back to a whole-image crop

# Quarter turn k (counter-clockwise, as torch.rot90 over the last two dims) as a 2x2 matrix acting
# on output coordinates (x, y): k = 1 maps (x, y) -> (-y, x).
_QUARTER_TURNS = torch.tensor(
    [
        [[1.0, 0.0], [0.0, 1.0]],
        [[0.0, -1.0], [1.0, 0.0]],
        [[-1.0, 0.0], [0.0, -1.0]],
        [[0.0, 1.0], [-1.0, 0.0]],
    ]
)


def _uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator
) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes in normalised coordinates, vectorised over `n` crops.

    Returns (center [n, 2], half_size [n, 2]) as (x, y) in grid_sample's [-1, 1] frame, where the
    whole image is center 0 and half-size 1. Area fraction is uniform in `scale`, width/height
    ratio log-uniform in `ratio`; the first of several draws that fits the image is kept, and a
    crop with no fitting draw takes the largest box of admissible ratio, centred.
    """
    area = _uniform((n, _CROP_ATTEMPTS), scale[0], scale[1], generator)
    log_ratio = _uniform((n, _CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect_ratio = torch.exp(log_ratio)
    width_fraction = torch.sqrt(area * aspect_ratio * height / width)
    height_fraction = torch.sqrt(area / aspect_ratio * width / height)
    fits = (width_fraction <= 1.0) & (height_fraction <= 1.0)
    first_fit = fits.int().argmax(dim=1, keepdim=True)
    half_size = torch.stack(
        [width_fraction.gather(1, first_fit)[:, 0], height_fraction.gather(1, first_fit)[:, 0]],
        dim=1,
    )
    image_ratio = width / height
    clamped_ratio = min(max(image_ratio, ratio[0]), ratio[1])
    fallback = torch.tensor(
        [min(1.0, clamped_ratio / image_ratio), min(1.0, image_ratio / clamped_ratio)]
    )
    half_size = torch.where(fits.any(dim=1, keepdim=True), half_size, fallback)
    center = (2.0 * torch.rand((n, 2), generator=generator) - 1.0) * (1.0 - half_size)
    return center, half_size


def crop_affine(
    center: torch.Tensor,
    half_size: torch.Tensor,
    hflip: torch.Tensor,
    vflip: torch.Tensor,
    quarter_turns: torch.Tensor,
) -> torch.Tensor:
    """[n, 2, 3] affine_grid matrices combining the crop box, quarter turns and flips.

    An output coordinate o in [-1, 1]^2 samples the input at center + half_size * (R F o), so the
    view equals crop -> resize -> rotate (R) -> flip (F) done in one resampling.
    """
    flip_signs = torch.stack([1.0 - 2.0 * hflip.float(), 1.0 - 2.0 * vflip.float()], dim=1)
    orientation = _QUARTER_TURNS[quarter_turns % 4] * flip_signs[:, None, :]
    linear = half_size[:, :, None] * orientation
    return torch.cat([linear, center[:, :, None]], dim=2)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each image [B, C, H, W] with its own sigma [B], as one separable grouped convolution.

    Borders are replicated (reflection would need images larger than the kernel).
    """
    batch, channels, height, width = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    size = 2 * radius + 1
    planes = images.reshape(1, batch * channels, height, width)
    planes = F.pad(planes, (radius, radius, 0, 0), mode="replicate")
    planes = F.conv2d(planes, kernels.view(-1, 1, 1, size), groups=batch * channels)
    planes = F.pad(planes, (0, 0, radius, radius), mode="replicate")
    planes = F.conv2d(planes, kernels.view(-1, 1, size, 1), groups=batch * channels)
    return planes.view(batch, channels, height, width)


def _check_images(images: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """Return (B, H, W) shared by all modalities, or say which modality disagrees."""
    if not images:
        raise ValueError("images is empty: expected at least one modality")
    shapes = {}
    for name, tensor in images.items():
        if tensor.ndim != 4 or not tensor.is_floating_point():
            raise ValueError(
                f"modality {name!r} must be a normalised float [B, C, H, W] tensor, "
                f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
        shapes[name] = (tensor.shape[0], tensor.shape[2], tensor.shape[3])
    if len(set(shapes.values())) > 1:
        raise ValueError(f"modalities must share batch size, height and width (B, H, W): {shapes}")
    if len({tensor.device for tensor in images.values()}) > 1:
        raise ValueError("all modalities must be on the same device")
    return next(iter(shapes.values()))


def _either(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], chosen: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per sample, every modality of the second date where ``chosen``, else of the first."""
    pick = chosen.to(next(iter(first.values())).device)[:, None, None, None]
    return {name: torch.where(pick, second[name], first[name]) for name in first}


class MultiCropAugment:
    """DINOv2 multi-crop (2 global + n local views) for a batch of co-registered modalities.

    Outputs are crop-major: rows v*B .. (v+1)*B-1 of each tensor hold view v of samples 0..B-1.
    """

    def __init__(
        self,
        crops: CropsConfig,
        augment: AugmentConfig | None = None,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        """``crops`` and ``augment`` check their own values; ``ratio`` is the crops' aspect-ratio
        range (torchvision's RandomResizedCrop default, which DINOv2 keeps)."""
        if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {ratio}")
        self.crops = crops
        self.augment = augment or AugmentConfig()
        self.ratio = tuple(ratio)
        # The kernel covers +-3 sigma of the widest blur; fixed, so no device sync is needed.
        self.blur_radius = math.ceil(3.0 * self.augment.blur_sigma[1])

    def __call__(
        self,
        images: dict[str, torch.Tensor],
        generator: torch.Generator,
        share: BatchShare | None = None,
        second: dict[str, torch.Tensor] | None = None,
        locals_from_either: bool = False,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Views of the batch; with ``share`` it is one rank's share of a global batch.

        Every random draw is then made for the whole global batch and the rank takes its
        samples: the crops of a sample do not depend on how a global batch is split across
        processes (one process with 2B samples draws what two processes with B samples each do).

        ``second`` (seasonal views) holds another date of each sample: the second global crop is
        cut from it, and with ``locals_from_either`` each local crop of a sample from either
        date (drawn; ``"local_from_second"`` says which). Without it the draws are today's.
        """
        batch = _check_images(images)[0]
        share = share or BatchShare(batch)
        if share.batch_size != batch:
            raise ValueError(f"a share of {share.batch_size} samples, but {batch} images")
        if second is not None and (
            second.keys() != images.keys() or _check_images(second) != _check_images(images)
        ):
            raise ValueError("the second date must have the first date's shapes")
        sources = [images, images if second is None else second]
        crops = self.crops
        global_views = [
            self._view(
                source, crops.global_crops_size, crops.global_crops_scale, prob, generator, share
            )
            for source, prob in zip(sources, self.augment.blur_prob_global, strict=True)
        ]
        local_views, from_second = [], []
        for _ in range(crops.local_crops_number):
            source = images
            if second is not None and locals_from_either:
                chosen = (torch.rand(share.global_batch, generator=generator) < 0.5)[share.samples]
                source = _either(images, second, chosen)
                from_second.append(chosen)
            local_views.append(
                self._view(
                    source,
                    crops.local_crops_size,
                    crops.local_crops_scale,
                    self.augment.blur_prob_local,
                    generator,
                    share,
                )
            )
        views = {
            "global_crops": self._stack_views(images, global_views, crops.global_crops_size),
            "local_crops": self._stack_views(images, local_views, crops.local_crops_size),
        }
        if from_second:
            views["local_from_second"] = torch.cat(from_second)
        return views

    @staticmethod
    def _stack_views(
        images: dict[str, torch.Tensor], views: list[dict[str, torch.Tensor]], size: int
    ) -> dict[str, torch.Tensor]:
        stacked = {}
        for name, tensor in images.items():
            if views:
                stacked[name] = torch.cat([view[name] for view in views])
            else:
                stacked[name] = tensor.new_empty((0, tensor.shape[1], size, size))
        return stacked

    def _view(
        self,
        images: dict[str, torch.Tensor],
        size: int,
        scale: tuple[float, float],
        blur_prob: float,
        generator: torch.Generator,
        share: BatchShare,
    ) -> dict[str, torch.Tensor]:
        """One view of every sample: shared geometry, then per-modality photometry."""
        reference = next(iter(images.values()))
        batch, _, height, width = reference.shape
        total, mine = share.global_batch, share.samples
        center, half_size = sample_crop_boxes(total, height, width, scale, self.ratio, generator)
        hflip = torch.rand(total, generator=generator) < self.augment.flip_prob
        vflip = torch.rand(total, generator=generator) < self.augment.flip_prob
        turns = torch.randint(0, 4 if self.augment.rotate90 else 1, (total,), generator=generator)
        theta = crop_affine(center[mine], half_size[mine], hflip[mine], vflip[mine], turns[mine])
        theta = theta.to(reference.device)
        grid = F.affine_grid(theta, [batch, 1, size, size], align_corners=False)
        view = {}
        # Sorted, so the random stream does not depend on the dict's insertion order.
        for name in sorted(images):
            crops = F.grid_sample(
                images[name],
                grid.to(images[name].dtype),
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            )
            view[name] = self._photometric(crops, blur_prob, generator, share)
        return view

    def _photometric(
        self,
        crops: torch.Tensor,
        blur_prob: float,
        generator: torch.Generator,
        share: BatchShare,
    ) -> torch.Tensor:
        """Per-band gain, contrast around each band's mean, additive brightness, optional blur."""
        channels = crops.shape[1]
        total, mine = share.global_batch, share.samples
        aug = self.augment
        band_gain = _uniform(
            (total, channels), 1.0 - aug.band_jitter, 1.0 + aug.band_jitter, generator
        )[mine]
        contrast = _uniform((total,), 1.0 - aug.contrast, 1.0 + aug.contrast, generator)[mine]
        brightness = _uniform((total,), -aug.brightness, aug.brightness, generator)[mine]
        blurred = (torch.rand(total, generator=generator) < blur_prob)[mine]
        sigma = _uniform((total,), aug.blur_sigma[0], aug.blur_sigma[1], generator)[mine]

        def on_device(values: torch.Tensor) -> torch.Tensor:
            return values.to(device=crops.device, dtype=crops.dtype)

        crops = crops * on_device(band_gain)[:, :, None, None]
        band_mean = crops.mean(dim=(-2, -1), keepdim=True)
        crops = (crops - band_mean) * on_device(contrast)[:, None, None, None] + band_mean
        crops = crops + on_device(brightness)[:, None, None, None]
        if blurred.any():
            selected = blurred.nonzero()[:, 0].to(crops.device)
            crops[selected] = gaussian_blur(
                crops[selected], on_device(sigma[blurred]), self.blur_radius
            )
        return crops
