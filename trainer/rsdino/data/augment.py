"""Batched DINO multi-crop for co-registered multispectral / SAR images, on any device.

Each view of a sample is one affine map (crop box, flips, quarter turns) applied by a single
`grid_sample`, shared by all modalities so that optical and radar crops stay aligned. Photometric
changes work in normalised space and are drawn per modality, because the sensors are independent.
Randomness comes from one CPU generator: the same generator state gives the same crops anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass
class _ViewDraws:
    """The random draws of one view of a rank's samples, on the CPU.

    ``photometry[name]`` holds the modality's ``gain`` [b, C] and ``contrast``, ``brightness``,
    ``blurred`` and ``sigma`` [b]; ``from_second`` [b] says which samples take the second date.
    """

    theta: torch.Tensor
    photometry: dict[str, dict[str, torch.Tensor]]
    from_second: torch.Tensor | None


def _to_device_in_one_copy(
    tensors: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """The CPU tensors on ``device`` as float32, moved together.

    One host-to-device copy (from pinned memory, so it does not block the host) instead of one
    per parameter tensor: a step's views otherwise wait on about sixty small blocking copies.
    Integer and bool values survive float32 exactly (indices below 2**24).
    """
    flat = torch.cat([tensor.reshape(-1).to(torch.float32) for tensor in tensors.values()])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    parts = flat.split([tensor.numel() for tensor in tensors.values()])
    return {
        key: part.view(tensor.shape)
        for (key, tensor), part in zip(tensors.items(), parts, strict=True)
    }


class MultiCropAugment:
    """DINOv2 multi-crop (2 global + n local views) for a batch of co-registered modalities.

    Outputs are crop-major: rows v*B .. (v+1)*B-1 of each tensor hold view v of samples 0..B-1.
    All draws are made on the CPU first and moved in one copy; the views of one crop size are
    then cut by one ``grid_sample`` per modality and source date, and jittered and blurred in
    batched kernels.
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
        batch, height, width = _check_images(images)
        share = share or BatchShare(batch)
        if share.batch_size != batch:
            raise ValueError(f"a share of {share.batch_size} samples, but {batch} images")
        if second is not None and (
            second.keys() != images.keys() or _check_images(second) != _check_images(images)
        ):
            raise ValueError("the second date must have the first date's shapes")
        crops, channels = self.crops, {name: images[name].shape[1] for name in sorted(images)}

        def draw(scale: tuple[float, float], blur_prob: float, from_second: torch.Tensor | None):
            return self._draw_view(
                (height, width), channels, scale, blur_prob, from_second, generator, share
            )

        global_draws = [
            draw(
                crops.global_crops_scale,
                prob,
                None if second is None else torch.full((batch,), bool(view)),
            )
            for view, prob in enumerate(self.augment.blur_prob_global)
        ]
        local_draws = []
        for _ in range(crops.local_crops_number):
            chosen = None
            if second is not None and locals_from_either:
                chosen = (torch.rand(share.global_batch, generator=generator) < 0.5)[share.samples]
            local_draws.append(draw(crops.local_crops_scale, self.augment.blur_prob_local, chosen))
        device = next(iter(images.values())).device
        sources = (images,) if second is None else (images, second)
        views = {
            "global_crops": self._render(sources, global_draws, crops.global_crops_size, device),
            "local_crops": self._render(sources, local_draws, crops.local_crops_size, device),
        }
        if local_draws and local_draws[0].from_second is not None:
            views["local_from_second"] = torch.cat([view.from_second for view in local_draws])
        return views

    def _draw_view(
        self,
        image_size: tuple[int, int],
        channels: dict[str, int],
        scale: tuple[float, float],
        blur_prob: float,
        from_second: torch.Tensor | None,
        generator: torch.Generator,
        share: BatchShare,
    ) -> _ViewDraws:
        """One view's shared geometry, then each modality's photometry (sorted by name, so the
        random stream does not depend on the dict's insertion order)."""
        total, mine, aug = share.global_batch, share.samples, self.augment
        center, half_size = sample_crop_boxes(total, *image_size, scale, self.ratio, generator)
        hflip = torch.rand(total, generator=generator) < aug.flip_prob
        vflip = torch.rand(total, generator=generator) < aug.flip_prob
        turns = torch.randint(0, 4 if aug.rotate90 else 1, (total,), generator=generator)
        theta = crop_affine(center[mine], half_size[mine], hflip[mine], vflip[mine], turns[mine])
        photometry = {}
        for name, bands in channels.items():
            draws = {
                "gain": _uniform(
                    (total, bands), 1.0 - aug.band_jitter, 1.0 + aug.band_jitter, generator
                ),
                "contrast": _uniform((total,), 1.0 - aug.contrast, 1.0 + aug.contrast, generator),
                "brightness": _uniform((total,), -aug.brightness, aug.brightness, generator),
                "blurred": torch.rand(total, generator=generator) < blur_prob,
                "sigma": _uniform((total,), aug.blur_sigma[0], aug.blur_sigma[1], generator),
            }
            photometry[name] = {key: values[mine] for key, values in draws.items()}
        return _ViewDraws(theta, photometry, from_second)

    def _render(
        self,
        sources: tuple[dict[str, torch.Tensor], ...],
        draws: list[_ViewDraws],
        size: int,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """The views of one crop size, stacked crop-major, for every modality."""
        first = sources[0]
        if not draws:
            return {
                name: tensor.new_empty((0, tensor.shape[1], size, size))
                for name, tensor in first.items()
            }
        cpu = {"theta": torch.cat([view.theta for view in draws])}
        if draws[0].from_second is not None:
            cpu["pick_second"] = torch.cat([view.from_second for view in draws])
        blurs = {}
        for name in first:
            for key in ("gain", "contrast", "brightness", "sigma"):
                cpu[f"{name}.{key}"] = torch.cat([view.photometry[name][key] for view in draws])
            blurred = torch.cat([view.photometry[name]["blurred"] for view in draws])
            blurs[name] = bool(blurred.any())
            cpu[f"{name}.blur_rows"] = blurred.nonzero()[:, 0]
        on = _to_device_in_one_copy(cpu, device)
        pick_second = on["pick_second"] > 0.5 if "pick_second" in on else None
        grid = self._grid(on["theta"], len(draws), size)
        views = {}
        for name in first:
            crops = self._sample(sources, name, grid, len(draws), pick_second)
            views[name] = self._photometric(
                crops,
                on[f"{name}.gain"],
                on[f"{name}.contrast"],
                on[f"{name}.brightness"],
                on[f"{name}.sigma"],
                on[f"{name}.blur_rows"].long() if blurs[name] else None,
            )
        return views

    @staticmethod
    def _grid(theta: torch.Tensor, n_views: int, size: int) -> torch.Tensor:
        """Sampling grid [b, n_views * size, size, 2]: each sample's views stacked vertically,
        so one ``grid_sample`` cuts all of them without repeating the input image."""
        grid = F.affine_grid(theta, [theta.shape[0], 1, size, size], align_corners=False)
        batch = theta.shape[0] // n_views
        return grid.view(n_views, batch, size, size, 2).transpose(0, 1).flatten(1, 2)

    @staticmethod
    def _sample(
        sources: tuple[dict[str, torch.Tensor], ...],
        name: str,
        grid: torch.Tensor,
        n_views: int,
        pick_second: torch.Tensor | None,
    ) -> torch.Tensor:
        """One modality's views [n_views * b, C, size, size], crop-major; where ``pick_second``
        is set, the row is cut from the second date."""

        def cut(images: torch.Tensor) -> torch.Tensor:
            out = F.grid_sample(
                images,
                grid.to(images.dtype),
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            )
            batch, channels, _, size = out.shape
            out = out.view(batch, channels, n_views, size, size).permute(2, 0, 1, 3, 4)
            return out.reshape(n_views * batch, channels, size, size)

        crops = cut(sources[0][name])
        if pick_second is None:
            return crops
        return torch.where(pick_second[:, None, None, None], cut(sources[1][name]), crops)

    def _photometric(
        self,
        crops: torch.Tensor,
        band_gain: torch.Tensor,
        contrast: torch.Tensor,
        brightness: torch.Tensor,
        sigma: torch.Tensor,
        blur_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-band gain, contrast around each band's mean, additive brightness, then blur of the
        rows in ``blur_rows``; every factor is one value per row (per band for the gain)."""
        dtype = crops.dtype
        crops = crops * band_gain.to(dtype)[:, :, None, None]
        band_mean = crops.mean(dim=(-2, -1), keepdim=True)
        crops = (crops - band_mean) * contrast.to(dtype)[:, None, None, None] + band_mean
        crops = crops + brightness.to(dtype)[:, None, None, None]
        if blur_rows is not None:
            crops[blur_rows] = gaussian_blur(
                crops[blur_rows], sigma.to(dtype)[blur_rows], self.blur_radius
            )
        return crops
