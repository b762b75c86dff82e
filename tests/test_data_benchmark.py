"""The data-path benchmark runs end to end at tiny sizes and reports every figure it promises."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "data_throughput.py"
PAIRS = 16
BATCH_SIZE = 4
SAMPLE_BYTES = 13 * 256 * 256 * 2 + 2 * 256 * 256 * 4  # S2 13 x uint16 + S1 2 x float32
# Batches also carry doy and label as int64 per sample.
BATCH_BYTES_PER_SAMPLE = SAMPLE_BYTES + 2 * 8


def test_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--pairs",
            str(PAIRS),
            "--workers",
            "1",
            "--batch-size",
            str(BATCH_SIZE),
            "--epochs",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(out.read_text())

    runs = {(run["path"], run["storage"], run["workers"]): run for run in report["throughput"]}
    assert set(runs) == {
        ("packed shards", "local", 0),
        ("packed shards", "local", 1),
        ("packed shards", "S3", 0),
        ("packed shards", "S3", 1),
        ("one object per tile", "local", 1),
        ("one object per tile", "S3", 1),
    }
    for run in runs.values():
        # One epoch of 16 samples in batches of 4, warm-up excluded.
        assert run["samples"] == PAIRS
        assert run["wall_s"] > 0 and run["cpu_us_per_sample"] > 0
        assert math.isclose(run["samples_per_s"], PAIRS / run["wall_s"])
        expected_mb = PAIRS * BATCH_BYTES_PER_SAMPLE / 1e6
        assert math.isclose(run["mb_per_s"] * run["wall_s"], expected_mb)

    steps = {step["step"]: step for step in report["decode"]}
    assert set(steps) == {
        "GeoTIFF pair (S2 + S1)",
        "GeoTIFF pair, AWS keys in env",
        "shard chunk decode",
        "shard chunk CRC-32 check",
    }
    for step in steps.values():
        assert step["samples"] >= PAIRS
        assert math.isclose(step["samples_per_s_per_core"] * step["us_per_sample"], 1e6)

    host = report["host_side"]
    assert host["cpu_us_per_sample"] == runs["packed shards", "local", 0]["cpu_us_per_sample"]
    assert math.isclose(host["samples_per_s_per_core"], 1e6 / host["cpu_us_per_sample"])

    slowdown, host_target = report["targets"]
    local, s3 = runs["packed shards", "local", 1], runs["packed shards", "S3", 1]
    assert math.isclose(slowdown["measured"], local["samples_per_s"] / s3["samples_per_s"])
    assert slowdown["passed"] == (slowdown["measured"] <= 1.5)
    assert math.isclose(host_target["measured"], host["samples_per_s_per_core"])
    assert host_target["passed"] == (host_target["measured"] >= 500)

    assert report["data"]["sample_mb"] == SAMPLE_BYTES / 1e6
    assert any("moto" in note for note in report["notes"])
    for word in ("PASS", "FAIL"):
        expected = sum(target["passed"] == (word == "PASS") for target in report["targets"])
        assert completed.stdout.count(word) == expected
