"""Cost of building a step's views: normalisation and multi-crop of a batch, and iBOT masks.

Both run inside the training step (``Trainer.make_views``), so their time and their
host-to-device copies add to every step. The defaults are issue 11's GPU multi-crop target: 64
Sen12MS pairs (13 + 2 bands of raw uint16, 256 x 256) into 2 x 192 + 8 x 96 views with blur and
normalisation in at most 4 ms. Reports the median milliseconds of each call and the
host-to-device copies one augmentation call makes (counted with the images on the 'meta' device
when the run is on the CPU, where a copy to the device does not exist):

    python benchmarks/view_building.py --out view_building.json        # on a GPU
    python benchmarks/view_building.py --batch 4 --tile 64 --global-size 32 --local-size 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rsdino.data.augment import MultiCropAugment
from rsdino.data.augment_config import AugmentConfig, CropsConfig
from rsdino.data.bands import BandNormalizer
from rsdino.data.masking import sample_ibot_masks


class HostToDeviceCopies(TorchDispatchMode):
    """Counts the tensor copies from the CPU to another device made inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            source, target = args[0], out
        elif func is torch.ops.aten.copy_.default:
            target, source = args[0], args[1]
        else:
            return out
        if source.device.type == "cpu" and target.device.type != "cpu":
            self.count += 1
        return out


def median_ms(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``call`` after one warm-up, waiting for the device each time."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000.0 * (time.perf_counter() - started))
    return statistics.median(times)


def count_copies(augment: MultiCropAugment, images: dict[str, torch.Tensor]) -> int:
    """Host-to-device copies of one augmentation call on ``images``' device."""
    with HostToDeviceCopies() as copies:
        augment(images, torch.Generator().manual_seed(0))
    return copies.count


def raw_pair(batch: int, bands: dict[str, int], tile: int, device: torch.device) -> dict:
    """Raw uint16-range tiles of each modality on ``device``, as the loader ships them."""
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.randint(0, 10_000, (batch, count, tile, tile), generator=generator)
        .to(torch.uint16)
        .to(device)
        for name, count in bands.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="samples per augmentation call")
    parser.add_argument("--s2-bands", type=int, default=13)
    parser.add_argument("--s1-bands", type=int, default=2, help="0: Sentinel-2 alone")
    parser.add_argument("--tile", type=int, default=256, help="input tile side, pixels")
    parser.add_argument("--global-size", type=int, default=192)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-number", type=int, default=8)
    parser.add_argument("--mask-images", type=int, default=128)
    parser.add_argument("--grid", type=int, default=12, help="patches per side of a global crop")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (median)")
    parser.add_argument("--target-ms", type=float, default=4.0, help="multi-crop goal on a GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    crops = CropsConfig(
        global_crops_size=args.global_size,
        local_crops_size=args.local_size,
        local_crops_number=args.local_number,
    )
    augment = MultiCropAugment(crops, AugmentConfig())
    bands = {"s2": args.s2_bands, **({"s1": args.s1_bands} if args.s1_bands else {})}
    normalizers = {
        name: BandNormalizer([1000.0] * count, [500.0] * count).to(device)
        for name, count in bands.items()
    }
    raw = raw_pair(args.batch, bands, args.tile, device)
    generator = torch.Generator().manual_seed(1)

    def normalise_and_crop() -> object:
        images = {name: normalizers[name](tensor) for name, tensor in raw.items()}
        return augment(images, generator)

    grid = (args.grid, args.grid)
    count_device = device if device.type != "cpu" else torch.device("meta")
    shapes = {name: (args.batch, count, args.tile, args.tile) for name, count in bands.items()}
    multicrop_ms = median_ms(normalise_and_crop, args.repeats, device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {key: value for key, value in vars(args).items() if key != "out"},
        "multicrop_ms": multicrop_ms,
        "multicrop_target_ms": args.target_ms,
        "multicrop_meets_target": device.type == "cuda" and multicrop_ms <= args.target_ms,
        "augment_host_to_device_copies": count_copies(
            augment,
            {name: torch.empty(shape, device=count_device) for name, shape in shapes.items()},
        ),
        "augment_copies_counted_on": str(count_device),
        "ibot_masks_ms": median_ms(
            lambda: sample_ibot_masks(args.mask_images, grid, (0.1, 0.5), 0.5, generator),
            args.repeats,
            device,
        ),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
