"""A real Prometheus scrapes a 2-rank torchrun run; the dashboard and alert queries run on it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import TINY_OVERRIDES, torchrun_train_command

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "helm" / "rsdino-pretrain" / "dashboards" / "rsdino.json"
RULES = ROOT / "helm" / "rsdino-pretrain" / "rules" / "rsdino-alerts.yaml"
JOB = "rsdino-it"
FAMILIES = [
    "rsdino_loss",
    "rsdino_step",
    "rsdino_steps_total",
    "rsdino_samples_total",
    "rsdino_tokens_total",
    "rsdino_step_duration_seconds_count",
    "rsdino_data_wait_seconds_count",
    "rsdino_learning_rate",
    "rsdino_weight_decay",
    "rsdino_teacher_momentum",
    "rsdino_teacher_temperature",
    "rsdino_mfu_ratio",
    "rsdino_world_size",
    "rsdino_restarts",
    "rsdino_resumed_from_step",
    "rsdino_checkpoint_save_duration_seconds_count",
    "rsdino_checkpoint_stall_seconds_count",
    "rsdino_checkpoint_failures_total",
    "rsdino_last_checkpoint_step",
    "rsdino_last_checkpoint_timestamp_seconds",
    "rsdino_data_errors_total",
    "rsdino_build_info",
]
# Panels with no data in this run: GPU memory needs CUDA; the storage families need a
# packed-shard store, and this run trains on synthetic tiles. Their queries must still parse.
NO_DATA_PANELS = {"GPU memory", "Storage requests", "Storage retries and errors", "Storage bytes"}
PANEL_VARIABLES = {"$job": JOB, "$__rate_interval": "10s", "$__range": "1m"}


def free_port_pair() -> int:
    """A port p with p and p + 1 free (ranks 0 and 1 serve base + local_rank)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """End a process we started in its own session, with everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def training(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen, Path]]:
    """2 ranks that train far longer than the test; killed at teardown."""
    base = free_port_pair()
    command = torchrun_train_command(
        2,
        tmp_path / "run",
        *TINY_OVERRIDES,
        "optim.epochs=1000",
        "checkpoint.every_steps=5",
        "metrics.enabled=true",
        "metrics.host=127.0.0.1",
        f"metrics.port={base}",
        f"metrics.job={JOB}",
        "metrics.peak_flops_per_device=1e9",
        "evaluation.eval_period_iterations=5",
        "evaluation.synthetic_counts=[32,16]",
    )
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
    yield base, process, log_path
    stop(process)


@pytest.fixture
def prometheus(tmp_path: Path, training) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, (
        "the prometheus binary is missing: .ci/run installs it (apt-get install prometheus)"
    )
    base, _, _ = training
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "rsdino-scrape",
                "honor_labels": True,  # keep the exporter's job label
                "static_configs": [{"targets": [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]}],
            }
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    with open(tmp_path / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={address}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    yield f"http://{address}"
    stop(process)


def api(url: str, path: str, **params: str) -> dict:
    query = urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=10) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as error:  # a bad query answers 400 with a JSON error body
        return json.load(error)
    except urllib.error.URLError:
        return {"status": "unreachable"}


def instant(url: str, expr: str) -> list[dict]:
    answer = api(url, "query", query=expr)
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def wait_for_scrapes(url: str, training_run: subprocess.Popen, log_path: Path) -> None:
    """Both ranks up, counting samples, and a checkpoint written (within 90 s)."""
    ready = f'count(rate(rsdino_samples_total{{job="{JOB}"}}[10s]) > 0) == 2'
    checkpoint = f'count(rsdino_last_checkpoint_step{{job="{JOB}"}}) == 2'
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert training_run.poll() is None, log_path.read_text()[-3000:]
        if api(url, "query", query=ready).get("data", {}).get("result") and instant(
            url, checkpoint
        ):
            return
        time.sleep(1)
    pytest.fail("training metrics never reached Prometheus:\n" + log_path.read_text()[-3000:])


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in PANEL_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def test_prometheus_scrapes_training_and_every_query_works(training, prometheus: str) -> None:
    _, training_run, log_path = training
    wait_for_scrapes(prometheus, training_run, log_path)

    targets = api(prometheus, "targets")["data"]["activeTargets"]
    assert [target["health"] for target in targets] == ["up", "up"]
    for family in FAMILIES:
        series = instant(prometheus, f'{family}{{job="{JOB}"}}')
        ranks = {(s["metric"]["rank"], s["metric"]["local_rank"]) for s in series}
        assert ranks == {("0", "0"), ("1", "1")}, family
        assert {s["metric"]["node"] for s in series} == {socket.gethostname()}, family
    # Periodic kNN: rank 0 holds the gathered result and exports it (before the step's save).
    knn = instant(prometheus, f'rsdino_eval_knn_accuracy{{job="{JOB}"}}')
    assert {(s["metric"]["rank"], s["metric"]["k"]) for s in knn} == {("0", "10"), ("0", "20")}
    assert all(0.0 < float(s["value"][1]) <= 1.0 for s in knn)
    assert float(instant(prometheus, f'rsdino_eval_step{{job="{JOB}"}}')[0]["value"][1]) >= 5
    throughput = instant(prometheus, f'sum(rate(rsdino_samples_total{{job="{JOB}"}}[10s]))')
    assert float(throughput[0]["value"][1]) > 0

    titles = {title for title, _ in panel_queries()}
    assert titles >= NO_DATA_PANELS
    for title, expr in panel_queries():
        result = instant(prometheus, expr)
        if title not in NO_DATA_PANELS:
            assert result, f"panel {title!r} has no data: {expr}"

    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            instant(prometheus, rule["expr"])
    loaded = api(prometheus, "rules")["data"]["groups"]
    assert {group["name"] for group in loaded} == {group["name"] for group in rules["groups"]}

    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: .ci/run installs it (apt-get install prometheus)"
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
