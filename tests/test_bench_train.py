"""`rsdino bench train`: each mode runs through the real CLI on a tiny model and reports what its
timings imply; model mode, with its views built ahead, trains exactly as Trainer.train_step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES

from rsdino.bench.report import Measurement, build_report, default_peak_tflops
from rsdino.bench.steps import ModelSteps, prefetch_batches
from rsdino.bench.train import bench_config
from rsdino.cli import main
from rsdino.train.loop import Trainer

TINY_BATCH = 4  # TINY_OVERRIDES' train.batch_size_per_gpu


def bench(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> dict:
    """Run the command; its stdout is exactly the JSON it writes to ``out``."""
    assert main(["bench", "train", "--config", "quickstart", "--out", str(out), *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    return report


@pytest.mark.parametrize("mode", ["model", "step", "e2e"])
def test_each_mode_reports_consistent_figures(
    mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Overrides before the options, as `rsdino train` allows; e2e caps 6 loader workers at 4.
    overrides = [*TINY_OVERRIDES, "train.num_workers=6"] if mode == "e2e" else TINY_OVERRIDES
    report = bench(capsys, tmp_path / "r.json", *overrides, "--mode", mode, "--steps", "3")
    assert (report["mode"], report["config"]) == (mode, "quickstart")
    assert report["overrides"] == overrides
    assert report["device"].startswith("cpu") and report["torch"] == torch.__version__
    assert (report["warmup_steps"], report["timed_steps"]) == (3, 3)
    assert (report["embed_dim"], report["depth"], report["batch_per_gpu"]) == (32, 2, TINY_BATCH)
    median_s = report["step_ms_median"] / 1e3
    assert 0 < report["step_ms_median"] <= report["step_ms_p90"]
    assert report["images_per_s"] == pytest.approx(TINY_BATCH / median_s)
    nominal, executed = report["flops_per_step_nominal"], report["flops_per_step_executed"]
    assert 0 < executed <= nominal  # stochastic depth can only skip work
    assert report["tflops_nominal"] == pytest.approx(nominal / median_s / 1e12)
    assert report["tflops_executed"] == pytest.approx(executed / median_s / 1e12)
    # No known peak for a CPU, hence no MFU; no CUDA memory figure off CUDA.
    assert report["peak_tflops"] is None and report["mfu_nominal"] is report["mfu_executed"] is None
    assert report["peak_memory_gib"] is None
    if mode == "e2e":
        assert 0 <= report["data_wait_fraction"] <= 1
        assert report["loader_workers"] == 4
    else:
        assert report["data_wait_fraction"] is report["loader_workers"] is None


def test_model_mode_views_built_ahead_train_as_train_step_does(tmp_path: Path) -> None:
    """Model mode builds every step's views before the first optimisation; the losses and the
    weights after must be those of train_step, which builds each step's views in turn."""
    cfg = bench_config("quickstart", [*TINY_OVERRIDES, "student.drop_path_rate=0.2"])
    reference, bench_trainer = (Trainer(cfg, tmp_path / name) for name in ("ref", "bench"))
    batches = prefetch_batches(cfg, reference, 3)
    expected = [reference.train_step(batch, step)["total"] for step, batch in enumerate(batches)]
    steps = ModelSteps(bench_trainer, batches)
    got = [bench_trainer.optimise(views, step)["total"] for step, views in enumerate(steps.views)]
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=1e-6, rtol=0)
    for mine, theirs in zip(
        bench_trainer.model.state_dict().values(),
        reference.model.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "train", "--mode", "data"])
    assert exited.value.code == 2
    assert "invalid choice: 'data'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "train", "--steps", "0"])
    assert "--steps: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "train", "--peak-tflops", "0"])
    assert "--peak-tflops: must be > 0, got 0" in capsys.readouterr().err
    # TINY_OVERRIDES schedule 2 epochs x 3 steps = 6; refused before any model is built.
    args = ["bench", "train", "--config", "quickstart", "--warmup", "3", "--steps", "4"]
    assert main([*args, *TINY_OVERRIDES]) == 2
    assert "schedules only 6 steps but the benchmark needs 7" in capsys.readouterr().err


def test_default_peak_is_known_only_for_hopper_gpus() -> None:
    assert default_peak_tflops("NVIDIA H200") == 989.0
    assert default_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert default_peak_tflops("NVIDIA A100-SXM4-80GB") is None
    assert default_peak_tflops("cpu (x86_64)") is None


def test_report_arithmetic_from_hand_picked_step_times() -> None:
    cfg = bench_config("quickstart", TINY_OVERRIDES)
    measurement = Measurement(
        mode="e2e",
        device=torch.device("cpu"),
        device_name="NVIDIA H200",
        warmup_steps=2,
        step_seconds=[0.5, 2.5, 0.6, 0.4],
        peak_memory_bytes=3 * 2**30,
        nominal_flops=6e13,
        executed_flops=5e13,
        data_wait_fraction=0.25,
        loader_workers=4,
    )
    report = build_report(cfg, "quickstart", ["x=1"], measurement, peak_tflops=None)
    # Nearest-rank percentiles of 4 steps: the 2nd and the 4th smallest.
    assert report["step_ms_median"] == pytest.approx(500)
    assert report["step_ms_p90"] == pytest.approx(2500)
    assert report["images_per_s"] == pytest.approx(TINY_BATCH / 0.5)
    assert report["tflops_nominal"] == pytest.approx(120)
    assert report["tflops_executed"] == pytest.approx(100)
    assert report["peak_tflops"] == 989.0  # the H200 default
    assert report["mfu_nominal"] == pytest.approx(120 / 989)
    assert report["mfu_executed"] == pytest.approx(100 / 989)
    assert report["peak_memory_gib"] == pytest.approx(3.0)
    assert (report["data_wait_fraction"], report["loader_workers"]) == (0.25, 4)
    assert (report["warmup_steps"], report["timed_steps"], report["overrides"]) == (2, 4, ["x=1"])
    given = build_report(cfg, "quickstart", [], measurement, peak_tflops=100.0)
    assert given["mfu_executed"] == pytest.approx(1.0)
