"""The benchmark scripts run end to end (tiny sizes; the figures themselves come from real runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    "config", [["--config", "quickstart"], ["--config", "quickstart_multimodal"]]
)
def test_knn_signal_reports_both_accuracies(config: list[str], tmp_path: Path) -> None:
    extra = ["student.xattn.nhead=2"] if "quickstart_multimodal" in config else []
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "knn_signal.py"),
            *config,
            "--output-dir",
            str(tmp_path / "run"),
            "--train-samples",
            "24",
            "--test-samples",
            "12",
            "-k",
            "5",
            *TINY_OVERRIDES,
            *extra,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    report = json.loads((tmp_path / "run" / "knn_signal.json").read_text())
    assert report["steps"] == 6
    for key in ("knn_top1_random_init", "knn_top1_pretrained"):
        assert 0.0 <= report[key] <= 1.0


def test_metrics_overhead_reports_a_ratio() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "metrics_overhead.py"),
            "--steps",
            "3",
            *[item for item in TINY_OVERRIDES if not item.startswith("metrics.")],
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout[done.stdout.index("{") :])
    assert 0 < report["overhead_ratio"] < 1
    assert done.returncode == (0 if report["overhead_ratio"] < 0.01 else 1)
