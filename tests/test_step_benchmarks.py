"""The GPU session's scripts run end to end on the CPU with a tiny model (gpu_session.sh dry run).

The session runs gpu_checks.py, `rsdino bench train` (each mode, each config) and
checkpoint_stall.py as subprocesses once per module; the tests read the JSON reports it leaves
and check their fields against values worked out here. The command itself is tested in
tests/test_bench_train.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
BENCH_REPORTS = (
    *(
        f"{mode}_{config}"
        for mode in ("model", "step", "e2e")
        for config in ("quickstart", "vitl16_short")
    ),
    "model_vitl16_short_eager",
    "model_vitl16_short_ac",
)
# Issue 11's other targets: (report, preset, arch).
TARGET_REPORTS = (
    ("model_vitb16", "vitl16_short", "vit_base"),
    ("e2e_vitb16", "vitl16_short", "vit_base"),
    ("model_vits16", "vitl16_short", "vit_small"),
    ("model_multimodal_vitb16", "vitl16_short_multimodal", "vit_base"),
)
TINY_BATCH = 4  # the dry run's train.batch_size_per_gpu


def load_script(name: str) -> ModuleType:
    """A benchmark script as a module (registered first: its dataclasses look themselves up)."""
    module_name = f"benchmark_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


@pytest.fixture(scope="module")
def session_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("gpu_session.sh needs bash and coreutils timeout")
    out = tmp_path_factory.mktemp("gpu_out")
    env = {**os.environ, "OUT": str(out), "GPU_SESSION_DRY_RUN": "1", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_session.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def read_report(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_dry_run_writes_every_report_and_a_log(session_out: Path) -> None:
    targets = [name for name, *_ in TARGET_REPORTS]
    for name in ("gpu_checks", "view_building", *BENCH_REPORTS, *targets, "ckpt_stall"):
        assert (session_out / f"{name}.json").is_file(), name
    log = (session_out / "session.log").read_text()
    assert "FAIL" not in log


@pytest.mark.slow
def test_checkpoint_stall_report(session_out: Path) -> None:
    report = read_report(session_out, "ckpt_stall")
    stall = report["stall"]
    for mode in ("sync", "async"):
        assert stall[mode]["checkpoints"] == 2
        assert stall[mode]["stall_seconds_mean"] > 0
        assert stall[mode]["checkpoint_bytes"] > 0
        assert stall[mode]["complete_checkpoints"], mode
    assert stall["none"]["checkpoints"] == 0 and stall["none"]["complete_checkpoints"] == []
    assert stall["async_vs_sync_stall_ratio"] == pytest.approx(
        stall["async"]["stall_seconds_mean"] / stall["sync"]["stall_seconds_mean"]
    )
    recovery = report["recovery"]
    assert recovery["resumed_at_step"] == 3  # the step after the step-2 checkpoint
    assert recovery["death_to_first_step_seconds"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCH_REPORTS)
def test_bench_report_fields(session_out: Path, name: str) -> None:
    report = read_report(session_out, name)
    mode, _, config = name.partition("_")
    variant = config.removeprefix("quickstart").removeprefix("vitl16_short")
    assert (report["mode"], report["config"]) == (mode, config.removesuffix(variant))
    assert report["device"].startswith("cpu")
    assert report["precision"] == "fp32"  # precision=auto stays fp32 on a CPU
    assert (report["embed_dim"], report["depth"], report["batch_per_gpu"]) == (32, 2, TINY_BATCH)
    assert report["activation_checkpointing"] is (variant == "_ac")
    assert report["compiled_blocks"] is False  # compile=auto is off on a CPU; eager says so too
    assert (report["warmup_steps"], report["timed_steps"]) == (1, 2)
    median_s = report["step_ms_median"] / 1e3
    assert report["images_per_s"] == pytest.approx(TINY_BATCH / median_s)
    assert report["tflops_executed"] == pytest.approx(
        report["flops_per_step_executed"] / median_s / 1e12
    )
    # No known peak for a CPU, hence no MFU; no CUDA memory figure off CUDA.
    assert report["peak_tflops"] is None and report["mfu_nominal"] is None
    assert report["peak_memory_gib"] is None
    if mode == "e2e":
        assert 0 <= report["data_wait_fraction"] <= 1 and report["loader_workers"] == 0
    else:
        assert report["data_wait_fraction"] is None


@pytest.mark.slow
def test_bench_reports_name_the_arch(session_out: Path) -> None:
    quickstart = read_report(session_out, "step_quickstart")
    vitl = read_report(session_out, "e2e_vitl16_short")
    assert (quickstart["arch"], quickstart["patch_size"]) == ("vit_small", 8)
    assert (vitl["arch"], vitl["patch_size"]) == ("vit_large", 16)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "preset", "arch"), TARGET_REPORTS)
def test_target_reports_bench_the_asked_model(
    session_out: Path, name: str, preset: str, arch: str
) -> None:
    report = read_report(session_out, name)
    assert (report["mode"], report["config"], report["arch"]) == (name.split("_")[0], preset, arch)
    # The dry run's tiny width, depth and batch come after the model's own overrides.
    assert (report["embed_dim"], report["depth"], report["batch_per_gpu"]) == (32, 2, TINY_BATCH)


@pytest.mark.slow
def test_gpu_checks_report(session_out: Path) -> None:
    report = read_report(session_out, "gpu_checks")
    assert report["device"] == "cpu" and report["all_ok"] is True
    transfer = report["transfer"]
    assert transfer["shape"] == [TINY_BATCH, 13, 32, 32] and transfer["dtype"] == "uint16"
    uint16_bytes = TINY_BATCH * 13 * 32 * 32 * 2
    assert transfer["uint16_bytes"] == uint16_bytes
    assert transfer["float32_bytes"] == 2 * uint16_bytes
    assert transfer["bytes_saved_per_batch"] == uint16_bytes
    assert transfer["normalized_max_abs_diff"] == 0.0  # same fp32 arithmetic on the same device
    assert "uint16_gb_per_s" not in transfer  # bandwidth is a CUDA figure only
    augment = report["augment"]
    # 2 global views and 2 local views of 4 samples, crop-major.
    assert augment["global_crops_shape"] == [2 * TINY_BATCH, 13, 32, 32]
    assert augment["local_crops_shape"] == [2 * TINY_BATCH, 13, 16, 16]
    assert augment["dtype"] == "float32" and augment["max_abs_diff_vs_cpu"] == 0.0
    assert augment["samples_per_s"] > 0
    bf16 = report["bf16_forward"]
    assert bf16["depth"] == 2
    # Autocast must round something (0 would mean it never ran in bf16), but stay within tolerance.
    for key in ("relative_error_cls", "relative_error_patch"):
        assert 0 < bf16[key] <= bf16["tolerance"]
    step = report["fast_step"]
    # The dry run's fast side is bf16 autocast on the CPU (blocks compile on CUDA only).
    assert (step["fast"]["precision"], step["plain"]["precision"]) == ("bfloat16", "fp32")
    assert step["fast"]["compiled_blocks"] is step["plain"]["compiled_blocks"] is False
    assert len(step["fast"]["losses"]) == len(step["plain"]["losses"]) == 2
    assert 0 < step["relative_error_max"] <= step["tolerance"]


def _processes_naming(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains ``text``, this one excepted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table")
def test_recovery_measurement_leaves_no_process_behind(tmp_path: Path) -> None:
    """torchrun starts workers in sessions of their own; all of them must be gone on return."""
    stall = load_script("checkpoint_stall")
    workdir = tmp_path / "work"
    workdir.mkdir()
    # A schedule far longer than the measurement: a surviving worker would still be training.
    overrides = [*TINY_OVERRIDES, "train.OFFICIAL_EPOCH_LENGTH=200"]
    try:
        report = stall.measure_recovery("quickstart", overrides, 1, 2, workdir, timeout=240)
        survivors = _processes_naming(str(workdir))
        assert survivors == [], "the recovery run outlived the benchmark"
    finally:
        for pid in _processes_naming(str(workdir)):  # never leave a worker running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert report["resumed_at_step"] == 3
    shutil.rmtree(workdir)  # what the benchmark's TemporaryDirectory does next
    time.sleep(1.0)
    assert not workdir.exists(), "something still writes into the deleted run directory"
