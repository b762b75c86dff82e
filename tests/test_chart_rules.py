"""The chart's PrometheusRule through the real promtool: the rendered groups load as a rules
file, and a unit test (tests/promtool/rsdino-alerts.test.yaml) makes each alert fire on a broken
job's synthetic series while it stays silent for a healthy job at the same time."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import find_one, render_chart

UNIT_TESTS = Path(__file__).parent / "promtool" / "rsdino-alerts.test.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: .ci/run installs it (apt-get install prometheus)"
    return binary


@pytest.fixture(scope="module")
def rule_groups() -> list[dict[str, Any]]:
    """The groups of the PrometheusRule the chart renders (release labels on, as for kps)."""
    values = {"metrics": {"prometheusRule": {"labels": {"release": "kube-prometheus-stack"}}}}
    rule = find_one(render_chart(values), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def _write_rules(directory: Path, groups: list[dict[str, Any]]) -> Path:
    path = directory / "rsdino-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def _write_unit_tests(directory: Path, rules_file: Path) -> Path:
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(rules_file)]
    path = directory / "rsdino-alerts.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_rendered_rules_pass_promtool_check(
    promtool: str, rule_groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    result = _run(promtool, "check", "rules", str(_write_rules(tmp_path, rule_groups)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_each_alert_fires_on_broken_series_and_not_on_healthy_ones(
    promtool: str, rule_groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    rules_file = _write_rules(tmp_path, rule_groups)
    result = _run(promtool, "test", "rules", str(_write_unit_tests(tmp_path, rules_file)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_cover_every_alert_both_ways(rule_groups: list[dict[str, Any]]) -> None:
    alerts = {rule["alert"] for group in rule_groups for rule in group["rules"] if "alert" in rule}
    fires: set[str] = set()
    silent: set[str] = set()
    for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        series = " ".join(item["series"] for item in group["input_series"])
        assert 'job="good"' in series and 'job="bad"' in series
        for case in group["alert_rule_test"]:
            expected = case["exp_alerts"]
            (fires if expected else silent).add(case["alertname"])
            # a firing case names only the broken job, so the healthy one must stay silent
            assert all(alert["exp_labels"]["job"] == "bad" for alert in expected)
    assert fires == alerts and silent == alerts


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("RsdinoCheckpointStale", "> 7200", "> 9000"),
        ("RsdinoStorageErrorRateHigh", 'status!~"ok|404"', 'status!~"ok|404|503"'),
        ("RsdinoNoTrainingProgress", "== 0", "< 0"),
    ],
)
def test_unit_tests_catch_a_broken_rule(
    promtool: str, rule_groups: list[dict[str, Any]], tmp_path: Path, alert: str, old: str, new: str
) -> None:
    """The unit tests are sharp: weakening one rule makes them fail."""
    mutated = yaml.safe_load(yaml.safe_dump(rule_groups))
    rule = next(r for g in mutated for r in g["rules"] if r.get("alert") == alert)
    assert old in rule["expr"]
    rule["expr"] = rule["expr"].replace(old, new)
    rules_file = _write_rules(tmp_path, mutated)
    result = _run(promtool, "test", "rules", str(_write_unit_tests(tmp_path, rules_file)))
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr
