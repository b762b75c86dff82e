"""Render the rsdino-pretrain chart with the real Helm engine (helm-python-sdk) for tests.

The public wrapper's ``Chart.render`` has no ``--api-versions`` / ``--kube-version`` options, but
the library's render call takes them (the same JSON options ``helm template`` has), so this module
passes them straight to it: tests can render "on a cluster with the Prometheus Operator" or
without one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from helm_python import Chart, _native

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = REPO_ROOT / "helm" / "rsdino-pretrain"
VALUES_DIR = REPO_ROOT / "k8s" / "values"

# What a cluster with the training operator and kube-prometheus-stack serves.
MONITORING_API = "monitoring.coreos.com/v1"
KUBEFLOW_API = "kubeflow.org/v1"
CLUSTER_API_VERSIONS: tuple[str, ...] = (
    KUBEFLOW_API,
    f"{KUBEFLOW_API}/PyTorchJob",
    MONITORING_API,
    f"{MONITORING_API}/PodMonitor",
    f"{MONITORING_API}/ServiceMonitor",
    f"{MONITORING_API}/PrometheusRule",
)

# Values for CPU tests of the rendered job (see the chart contract): one process per pod, a
# tiny model on synthetic data, checkpoints on a shared claim.
CPU_TEST_VALUES: dict[str, Any] = {
    "worker": {
        "replicas": 2,
        "nprocPerNode": 1,
        "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        "shmSizeLimit": "1Gi",
    },
    "elastic": {"minReplicas": 1, "maxReplicas": 2},
    "checkpoint": {"persistentVolumeClaim": "rsdino-checkpoints"},
    "training": {"preset": "quickstart", "overrides": {"train": {"device": "cpu"}}},
}


@functools.cache
def load_chart() -> Chart:
    """The chart, loaded once per test session (helm charts are immutable and thread-safe)."""
    return Chart.load(CHART_DIR)


def render_manifests(
    values: dict[str, Any] | None = None,
    *,
    release: str = "rsdino",
    namespace: str = "ml",
    api_versions: Sequence[str] = CLUSTER_API_VERSIONS,
    kube_version: str | None = None,
) -> dict[str, str]:
    """Template path -> rendered text, like ``helm template`` (raises HelmValuesError on values
    the schema rejects and HelmRenderError on a failed template or ``fail`` guard)."""
    opts: dict[str, Any] = {
        "name": release,
        "namespace": namespace,
        "is_install": True,
        "api_versions": list(api_versions),
    }
    if kube_version is not None:
        opts["kube_version"] = kube_version
    rendered = _native.call_string(
        "helm_render",
        load_chart()._raw(),
        json.dumps(values or {}),
        json.dumps(opts),
    )
    manifests: dict[str, str] = json.loads(rendered)
    return manifests


def render_chart(
    values: dict[str, Any] | None = None,
    *,
    release: str = "rsdino",
    namespace: str = "ml",
    api_versions: Sequence[str] = CLUSTER_API_VERSIONS,
    kube_version: str | None = None,
) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders, parsed; NOTES.txt is left out.

    ``api_versions`` are the group/versions the fake cluster serves (default: the operator and
    the Prometheus Operator); pass ``()`` for a bare cluster.
    """
    manifests = render_manifests(
        values,
        release=release,
        namespace=namespace,
        api_versions=api_versions,
        kube_version=kube_version,
    )
    objects: list[dict[str, Any]] = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(manifests[path]) if doc)
    return objects


def render_notes(values: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """The rendered NOTES.txt."""
    manifests = render_manifests(values, **kwargs)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def find(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """All objects of one kind, in render order."""
    return [obj for obj in objects if obj.get("kind") == kind]


def find_one(objects: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of a kind; fails loudly when there is none or several."""
    found = find(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def worker_container(job: dict[str, Any]) -> dict[str, Any]:
    """The ``pytorch`` container of the PyTorchJob's Worker pod template."""
    containers = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "pytorch")


def config_yaml(objects: Iterable[dict[str, Any]]) -> str:
    """The rsdino config file the chart's ConfigMap holds (key ``config.yaml``)."""
    config_maps = [c for c in find(objects, "ConfigMap") if "config.yaml" in c.get("data", {})]
    assert len(config_maps) == 1, f"expected one rsdino config ConfigMap, found {len(config_maps)}"
    text: str = config_maps[0]["data"]["config.yaml"]
    return text


def example_values(name: str) -> dict[str, Any]:
    """An example values file under k8s/values/ (``name`` without .yaml)."""
    loaded: dict[str, Any] = yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text())
    return loaded
