"""Functional checks of the device-side data path and of bf16 autocast, with their speeds.

1. transfer: a uint16 Sentinel-2 batch from the synthetic source goes host -> device pinned and
   non-blocking and is normalised there; the result must equal the CPU normalisation. The copy
   bandwidth of that uint16 batch is set against the same batch as float32 (why the loader ships
   raw integers).
2. augment: the training multi-crop (the default config's crops, or --crops) runs on the device
   with the same output shapes and dtypes as on the CPU, from the same random draws; augmentation
   samples/s on the device.
3. bf16: a ViT forward under bf16 autocast stays within a relative tolerance of fp32 (TF32 off).
4. fast step: training steps of a config (quickstart) on the same seeded batch give the same
   losses on the fast path (``train.compile=auto``, ``train.precision=auto``: compiled blocks and
   bf16 on a GPU; stochastic depth on a batch subset at rate 0.3) as on the plain eager fp32 path
   (TF32 off), within the bf16 tolerance.

On a CPU every check still runs (the transfer is then a no-op and its bandwidth is not reported),
so the script can be tried anywhere; the figures are meant for a GPU.

    python benchmarks/gpu_checks.py --out gpu_checks.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rsdino.config.loader import load_config
from rsdino.data.bands import BandNormalizer, band_stats
from rsdino.data.build import build_dataset
from rsdino.data.collate import collate_samples
from rsdino.data.synthetic import SyntheticLandCover
from rsdino.models.vit import build_vit
from rsdino.train.loop import Trainer, make_augment
from rsdino.train.runtime import resolve_compile, resolve_device

# bf16 keeps 8 mantissa bits (unit roundoff 2^-9); through a ViT-L the output drifts by about 1%
# (measured on CPU: 0.8-0.9%), so 3% flags a broken autocast without flagging rounding.
BF16_RELATIVE_TOLERANCE = 3e-2
# Normalisation is one subtraction and one division in fp32 on both sides: results must agree to
# the last bit or so (values are a few units, ulp ~ 5e-7).
NORMALIZE_TOLERANCE = 1e-5
SEED = 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean seconds of ``call`` after one untimed call, with the device drained at both ends."""
    call()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def synthetic_s2_batch(batch: int, tile: int) -> torch.Tensor:
    """uint16 [B, 13, tile, tile] as the loader collates it (Sen12MS band layout)."""
    source = SyntheticLandCover(batch, tile_size=tile, seed=SEED)
    return collate_samples([source[index] for index in range(batch)])["s2"]


def check_transfer(device: torch.device, batch: int, tile: int, repeats: int) -> dict[str, Any]:
    raw = synthetic_s2_batch(batch, tile)
    normalizer = BandNormalizer(*band_stats("s2", "sen12ms"))
    on_cpu = normalizer(raw)
    pinned = raw.pin_memory() if device.type == "cuda" else raw
    on_device = normalizer.to(device)(pinned.to(device, non_blocking=True))
    max_abs_diff = (on_device.cpu() - on_cpu).abs().max().item()
    float32_bytes = raw.numel() * torch.float32.itemsize
    report: dict[str, Any] = {
        "shape": list(raw.shape),
        "dtype": str(raw.dtype).removeprefix("torch."),
        "normalized_max_abs_diff": max_abs_diff,
        "tolerance": NORMALIZE_TOLERANCE,
        "uint16_bytes": raw.nbytes,
        "float32_bytes": float32_bytes,
        "bytes_saved_per_batch": float32_bytes - raw.nbytes,
        "ok": raw.dtype == torch.uint16 and max_abs_diff <= NORMALIZE_TOLERANCE,
    }
    if device.type != "cuda":
        return report
    pinned_float = raw.float().pin_memory()
    for name, tensor in (("uint16", pinned), ("float32", pinned_float)):
        seconds = seconds_per_call(
            lambda tensor=tensor: tensor.to(device, non_blocking=True), device, repeats
        )
        report[f"{name}_gb_per_s"] = tensor.nbytes / seconds / 1e9
        report[f"{name}_copy_ms"] = seconds * 1e3
    return report


def check_augment(
    device: torch.device, batch: int, tile: int, repeats: int, crop_overrides: list[str]
) -> dict[str, Any]:
    augment = make_augment(load_config(None, crop_overrides))
    normalized = torch.randn(batch, 13, tile, tile, generator=torch.Generator().manual_seed(SEED))

    def views(images: torch.Tensor) -> dict[str, torch.Tensor]:
        crops = augment({"s2": images}, torch.Generator().manual_seed(SEED))
        return {kind: crops[kind]["s2"] for kind in ("global_crops", "local_crops")}

    on_cpu = views(normalized)
    on_device_input = normalized.to(device)
    on_device = views(on_device_input)
    layout = {kind: (list(t.shape), str(t.dtype)) for kind, t in on_cpu.items()}
    same_layout = layout == {kind: (list(t.shape), str(t.dtype)) for kind, t in on_device.items()}
    stays_on_device = all(t.device.type == device.type for t in on_device.values())
    seconds = seconds_per_call(lambda: views(on_device_input), device, repeats)
    return {
        "global_crops_shape": layout["global_crops"][0],
        "local_crops_shape": layout["local_crops"][0],
        "dtype": layout["global_crops"][1].removeprefix("torch."),
        "device_matches_cpu_layout": same_layout,
        "output_device": str(on_device["global_crops"].device),
        # Same random draws on both sides, so the pixels agree up to kernel rounding (and TF32 in
        # the blur convolution on Ampere and later); reported, not judged.
        "max_abs_diff_vs_cpu": max(
            (on_device[kind].cpu() - on_cpu[kind]).abs().max().item() for kind in on_cpu
        ),
        "samples_per_s": batch / seconds,
        "ok": same_layout and stays_on_device,
    }


@contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """A true fp32 reference: no TF32 in matmuls or convolutions while inside."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact).norm() / exact.norm()).item()


def check_bf16_forward(
    device: torch.device, arch: str, depth: int | None, batch: int, image: int, patch: int
) -> dict[str, Any]:
    torch.manual_seed(SEED)
    # No LayerScale: at its 1e-5 init the blocks barely touch the tokens and bf16 errors would hide.
    model = build_vit(arch, img_size=image, patch_size=patch, in_chans=13, depth=depth)
    model = model.to(device).eval()
    images = torch.randn(batch, 13, image, image, device=device)
    with torch.no_grad():
        with full_fp32_matmuls():
            exact = model.forward_features(images)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            approx = model.forward_features(images)
    errors = {
        name: relative_error(approx[name], exact[name])
        for name in ("x_norm_clstoken", "x_norm_patchtokens")
    }
    return {
        "arch": arch,
        "depth": model.n_blocks,
        "input_shape": list(images.shape),
        "relative_error_cls": errors["x_norm_clstoken"],
        "relative_error_patch": errors["x_norm_patchtokens"],
        "tolerance": BF16_RELATIVE_TOLERANCE,
        "ok": max(errors.values()) <= BF16_RELATIVE_TOLERANCE,
    }


def step_losses(overrides: list[str], batch: dict, steps: int) -> tuple[list[float], dict]:
    """Total loss of each of ``steps`` training steps on ``batch``, and the path's settings."""
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = load_config("quickstart", overrides)
        trainer = Trainer(cfg, Path(output_dir), resume=False)
        losses = [float(trainer.train_step(batch, step)["total"]) for step in range(steps)]
    settings = {
        "precision": "fp32" if trainer.amp_dtype is None else str(trainer.amp_dtype)[6:],
        "compiled_blocks": resolve_compile(cfg.train.compile, trainer.device),
    }
    return losses, settings


def check_fast_step(device: torch.device, steps: int, overrides: list[str]) -> dict[str, Any]:
    common = [f"train.device={device.type}", "student.drop_path_rate=0.3", *overrides]
    cfg = load_config("quickstart", common)
    dataset = build_dataset(cfg)
    batch = collate_samples([dataset[i] for i in range(cfg.train.batch_size_per_gpu)])
    fast, fast_settings = step_losses([*common, "train.compile=auto"], batch, steps)
    with full_fp32_matmuls():
        plain_overrides = [*common, "train.compile=false", "train.precision=fp32"]
        plain, plain_settings = step_losses(plain_overrides, batch, steps)
    errors = [abs(a - b) / abs(b) for a, b in zip(fast, plain, strict=True)]
    return {
        "steps": steps,
        "fast": {"losses": fast, **fast_settings},
        "plain": {"losses": plain, **plain_settings},
        "relative_error_max": max(errors),
        "tolerance": BF16_RELATIVE_TOLERANCE,
        "ok": max(errors) <= BF16_RELATIVE_TOLERANCE,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=64, help="batch of the data-path checks")
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per speed figure")
    parser.add_argument(
        "--crops",
        nargs="*",
        default=[],
        metavar="key=value",
        help="crops.* overrides of the default config for the augment check",
    )
    parser.add_argument("--vit-arch", default="vit_large")
    parser.add_argument("--vit-depth", type=int, default=None, help="default: the arch's")
    parser.add_argument("--vit-batch", type=int, default=8)
    parser.add_argument("--vit-image", type=int, default=224, help="ViT input side in pixels")
    parser.add_argument("--vit-patch", type=int, default=16)
    parser.add_argument("--step-steps", type=int, default=3, help="steps of the fast-step check")
    parser.add_argument(
        "--step-overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="overrides of the quickstart preset for the fast-step check",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    checks = {
        "transfer": check_transfer(device, args.batch, args.tile, args.repeats),
        "augment": check_augment(device, args.batch, args.tile, args.repeats, args.crops),
        "bf16_forward": check_bf16_forward(
            device, args.vit_arch, args.vit_depth, args.vit_batch, args.vit_image, args.vit_patch
        ),
        "fast_step": check_fast_step(device, args.step_steps, args.step_overrides),
    }
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        **checks,
        "all_ok": all(check["ok"] for check in checks.values()),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
