"""Helpers of the metrics tests: a free port, a tiny config that serves metrics, a scrape."""

from __future__ import annotations

import socket
import urllib.request

from conftest import tiny_config
from omegaconf import DictConfig
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def enabled_config(port: int, *extra: str) -> DictConfig:
    return tiny_config(
        "metrics.enabled=true", "metrics.host=127.0.0.1", f"metrics.port={port}", *extra
    )


def scrape(url: str) -> dict[str, list]:
    """Samples by sample name (``rsdino_loss``, ``rsdino_steps_total``, ``..._bucket``)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    matches = [s for s in samples[name] if labels.items() <= s.labels.items()]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0].value
