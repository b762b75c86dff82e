"""The Prometheus exporter: families and labels over HTTP, errors, no-op mode, FLOPs estimate."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, tiny_config, train_command
from metrics_fixtures import enabled_config, free_port, scrape, value
from torch.utils.flop_counter import FlopCounterMode

from rsdino.errors import RsdinoError
from rsdino.models.heads import DINOHead
from rsdino.models.vit import VisionTransformer
from rsdino.ssl.meta_arch import SSLMetaArch
from rsdino.train.dist import DistContext
from rsdino.train.metrics import (
    DATA_ERROR_KINDS,
    DEFAULT_METRICS_PORT,
    DisabledMetrics,
    StepCost,
    TrainingMetrics,
    estimate_step_cost,
    metrics_address,
    start_metrics,
)

CPU = torch.device("cpu")
NO_COST = StepCost(flops=0.0, tokens=0)  # for tests of everything but the FLOPs
SCHEDULE = {"lr": 1e-3, "wd": 0.04, "momentum": 0.992, "teacher_temp": 0.04}
LOSSES = {"dino_global": 1.5, "dino_local": 2.5, "ibot": 0.5, "koleo": -0.25, "total": 4.25}


def _model_cost(cfg) -> StepCost:
    return estimate_step_cost(cfg, SSLMetaArch(cfg).student)


@pytest.fixture
def exporter():
    port = free_port() - 1  # local rank 1 serves base + 1
    cfg = enabled_config(port, "metrics.job=unit", "metrics.peak_flops_per_device=1e9")
    ctx = DistContext(rank=3, local_rank=1, world_size=4, device=CPU)
    metrics = start_metrics(cfg, ctx, "vit_small/16", _model_cost(cfg))
    yield cfg, metrics
    metrics.close()


def test_exporter_serves_every_family_with_rank_labels(exporter) -> None:
    cfg, metrics = exporter
    assert metrics.url.endswith(f":{cfg.metrics.port + 1}/metrics")
    metrics.set_resumed_from(6)
    for step, (wait, duration) in enumerate([(0.01, 0.5), (0.02, 1.5)], start=7):
        metrics.observe_step(step, samples=4, data_wait=wait, duration=duration)
    metrics.observe_interval(LOSSES, SCHEDULE)
    metrics.observe_checkpoint_stall(0.25)
    metrics.observe_checkpoint(8, seconds=2.0, committed=True)
    metrics.observe_checkpoint(10, seconds=9.0, committed=False)  # failed: counted, not "last"
    metrics.update_data_errors({"corrupt": 2})
    metrics.update_storage(
        {
            "requests": {("get", "ok"): 5, ("get", "throttled"): 1},
            "bytes_read": 1000,
            "bytes_written": 0,
            "retries": {"get": 1},
            "errors": {},
        }
    )
    samples = scrape(metrics.url)

    rsdino = {name: rows for name, rows in samples.items() if name.startswith("rsdino_")}
    for rows in rsdino.values():
        for sample in rows:
            assert sample.labels["rank"] == "3"
            assert sample.labels["local_rank"] == "1"
            assert sample.labels["node"] == socket.gethostname()
            assert sample.labels["job"] == "unit"
    for component, loss in LOSSES.items():
        assert value(samples, "rsdino_loss", component=component) == loss
    assert value(samples, "rsdino_step") == 8
    assert value(samples, "rsdino_steps_total") == 2
    assert value(samples, "rsdino_samples_total") == 8
    # 4 images: 2 global crops of (32/8)^2 = 16 patches, 2 local crops of (16/8)^2 = 4 patches.
    assert value(samples, "rsdino_tokens_total") == 2 * 4 * (2 * 16 + 2 * 4)
    assert value(samples, "rsdino_step_duration_seconds_count") == 2
    assert value(samples, "rsdino_step_duration_seconds_sum") == 2.0
    assert value(samples, "rsdino_step_duration_seconds_bucket", le="1.0") == 1
    assert value(samples, "rsdino_data_wait_seconds_sum") == pytest.approx(0.03)
    assert value(samples, "rsdino_learning_rate") == 1e-3
    assert value(samples, "rsdino_weight_decay") == 0.04
    assert value(samples, "rsdino_teacher_momentum") == 0.992
    assert value(samples, "rsdino_teacher_temperature") == 0.04
    flops = _model_cost(cfg).flops
    assert value(samples, "rsdino_mfu_ratio") == pytest.approx(flops * 2 / 2.0 / 1e9)
    assert "rsdino_gpu_memory_bytes" not in samples  # CUDA only
    assert value(samples, "rsdino_world_size") == 4
    assert value(samples, "rsdino_restarts") == 0
    assert value(samples, "rsdino_resumed_from_step") == 6
    assert value(samples, "rsdino_checkpoint_save_duration_seconds_sum") == 2.0
    assert value(samples, "rsdino_checkpoint_stall_seconds_sum") == 0.25
    assert value(samples, "rsdino_checkpoint_failures_total") == 1
    assert value(samples, "rsdino_last_checkpoint_step") == 8
    assert value(samples, "rsdino_last_checkpoint_timestamp_seconds") > 1.7e9
    assert value(samples, "rsdino_data_errors_total", kind="corrupt") == 2
    assert {s.labels["kind"] for s in samples["rsdino_data_errors_total"]} == set(DATA_ERROR_KINDS)
    assert value(samples, "rsdino_storage_requests_total", operation="get", status="ok") == 5
    assert value(samples, "rsdino_storage_requests_total", status="throttled") == 1
    assert value(samples, "rsdino_storage_bytes_total", direction="read") == 1000
    assert value(samples, "rsdino_storage_retries_total", operation="get") == 1
    assert value(samples, "rsdino_build_info", preset="vit_small/16") == 1


def test_counters_only_increase_when_a_source_restarts_its_counts(exporter) -> None:
    _, metrics = exporter
    metrics.update_data_errors({"nan": 3})
    metrics.update_data_errors({"nan": 1})  # e.g. a fresh source after a loader restart
    metrics.update_data_errors({"nan": 5})
    snapshot = {"requests": {("get", "ok"): 4}, "bytes_read": 40, "bytes_written": 0}
    metrics.update_storage({**snapshot, "retries": {"get": 2}})
    metrics.update_storage({**snapshot, "retries": {"get": 1}})
    samples = scrape(metrics.url)
    assert value(samples, "rsdino_data_errors_total", kind="nan") == 5
    assert value(samples, "rsdino_storage_retries_total", operation="get") == 2
    assert value(samples, "rsdino_storage_requests_total", operation="get") == 4


def test_unknown_peak_flops_exports_no_mfu() -> None:
    cfg = enabled_config(free_port())
    metrics = start_metrics(cfg, DistContext(0, 0, 1, CPU), "p", NO_COST)
    try:
        metrics.observe_step(1, samples=4, data_wait=0.0, duration=1.0)
        metrics.observe_interval(LOSSES, SCHEDULE)
        assert "rsdino_mfu_ratio" not in scrape(metrics.url)
    finally:
        metrics.close()


def test_port_in_use_names_the_port_and_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RsdinoError, match=rf"port {port} \(metrics\.port={port} "):
            start_metrics(enabled_config(port), DistContext(0, 0, 1, CPU), "p", NO_COST)


def test_disabled_metrics_is_a_no_op() -> None:
    metrics = start_metrics(tiny_config(), DistContext(0, 0, 1, CPU), "p", NO_COST)
    assert isinstance(metrics, DisabledMetrics)
    assert metrics.url is None
    public = {name for name in dir(TrainingMetrics) if not name.startswith("_")}
    assert public <= set(dir(DisabledMetrics))
    metrics.observe_step(1, samples=4, data_wait=0.0, duration=1.0)
    metrics.observe_interval(LOSSES, SCHEDULE)
    metrics.close()


def test_the_vit_reports_the_flops_of_a_hand_count_and_of_torch_s_flop_counter() -> None:
    # 4x4 image, patch 2: 4 patches + [CLS] = 5 tokens, dim 8, one block, FFN width 32.
    patch_embed = 2 * 4 * (3 * 2 * 2) * 8  # 768
    qkv_and_proj = 2 * 5 * (8 * 24 + 8 * 8)  # 2560
    attention = 2 * (5 * 5 * 8) * 2  # QK^T and AV: 800
    ffn = 2 * 5 * (8 * 32 + 32 * 8)  # 5120
    model = VisionTransformer(
        img_size=4, patch_size=2, in_chans=3, embed_dim=8, depth=1, num_heads=2
    )
    assert model.forward_flops(4) == patch_embed + qkv_and_proj + attention + ffn == 9248
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 4, 4))
    counted = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    # torch counts the convolution and the linear layers; its CPU attention kernel goes uncounted.
    assert counted == {"aten.convolution": patch_embed, "aten.addmm": qkv_and_proj + ffn}


def test_swiglu_registers_and_block_chunks_are_counted_from_the_layers() -> None:
    # SwiGLU of width 32 shrinks to (int(32 * 2 / 3) + 7) // 8 * 8 = 24: w12 8 -> 48, w3 24 -> 8.
    model = VisionTransformer(
        img_size=4,
        patch_size=2,
        in_chans=3,
        embed_dim=8,
        depth=2,
        num_heads=2,
        ffn_layer="swiglu",
        num_register_tokens=2,
        block_chunks=2,
    )
    tokens = 4 + 1 + 2
    block = 2 * tokens * (8 * 24 + 8 * 8) + 4 * tokens * tokens * 8 + 2 * tokens * (8 * 48 + 24 * 8)
    assert model.forward_flops(4) == 2 * 4 * 12 * 8 + 2 * block


def test_head_flops_hand_count() -> None:
    # 8 -> 16 -> 16 -> 4 bottleneck, then 4 -> 10 prototypes.
    head = DINOHead(in_dim=8, out_dim=10, nlayers=3, hidden_dim=16, bottleneck_dim=4)
    assert head.flops_per_token() == 2 * (8 * 16 + 16 * 16 + 16 * 4 + 4 * 10)
    single = DINOHead(in_dim=8, out_dim=10, nlayers=1, hidden_dim=16, bottleneck_dim=4)
    assert single.flops_per_token() == 2 * (8 * 4 + 4 * 10)


def test_step_cost_counts_student_three_times_and_teacher_on_global_crops() -> None:
    cfg = tiny_config("ibot.loss_weight=0")  # no masked patches: a deterministic count

    # Per rank: 4 images -> 8 global crops (16 patches each), 8 local crops (4 patches each).
    # ViT: dim 32, depth 2, FFN 128, 13 bands, patch 8, tokens = patches + [CLS].
    def vit(n_patches: int) -> int:
        tokens = n_patches + 1
        embed = 2 * n_patches * 13 * 8 * 8 * 32
        block = 2 * tokens * 4 * 32 * 32 + 4 * tokens * tokens * 32 + 2 * tokens * 2 * 32 * 128
        return embed + 2 * block

    head = 2 * (32 * 32 + 1 * 32 * 32 + 32 * 16 + 16 * 64)  # 3 layers, hidden 32, bottleneck 16
    student = 8 * vit(16) + 8 * vit(4) + 16 * head
    teacher = 8 * vit(16) + 8 * head
    cost = _model_cost(cfg)
    assert cost.flops == 3 * student + teacher
    assert cost.tokens == 8 * 16 + 8 * 4


def test_a_local_run_listens_on_loopback_and_moves_off_a_taken_default_port() -> None:
    """The quickstart must start while another run (or any program) holds port 9321."""
    cfg = tiny_config("metrics.enabled=true")  # host auto, port null: the defaults
    alone = DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("127.0.0.1", DEFAULT_METRICS_PORT))
            holder.listen()
        except OSError:
            pass  # someone else holds it already: the situation under test
        metrics = start_metrics(cfg, alone, "quickstart", NO_COST)
        try:
            assert metrics.url.startswith("http://127.0.0.1:")
            assert metrics.port != DEFAULT_METRICS_PORT
            assert "rsdino_build_info" in scrape(metrics.url)
        finally:
            metrics.close()


def test_distributed_ranks_keep_the_fixed_port_prometheus_scrapes() -> None:
    cfg = tiny_config("metrics.enabled=true")
    rank = DistContext(rank=5, local_rank=1, world_size=8, device=CPU)
    assert metrics_address(cfg.metrics, rank) == ("0.0.0.0", range(9322, 9323))


def test_two_local_runs_at_once_both_start_and_finish(tmp_path: Path) -> None:
    """Issue: a second quickstart failed with 'metrics port 9321 ... is unavailable'."""
    overrides = [item for item in TINY_OVERRIDES if not item.startswith("metrics.")]
    runs = [
        subprocess.Popen(
            train_command(tmp_path / f"run{index}", *overrides),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for index in range(2)
    ]
    outputs = [run.communicate(timeout=180)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-3000:]
    urls = {
        line.split("metrics served at ")[1].split()[0]
        for out in outputs
        for line in out.splitlines()
        if "metrics served at" in line
    }
    assert len(urls) == 2 and all(url.startswith("http://127.0.0.1:") for url in urls)
