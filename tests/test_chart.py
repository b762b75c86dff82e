"""The rsdino-pretrain Helm chart rendered by the real Helm engine, and every object it renders
checked against the Kubernetes OpenAPI schemas, the CRD schemas and the operator's SDK models.

Each values set is rendered once (functools.cache); the schema checks then loop over versions.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_chart import (
    CHART_DIR,
    CPU_TEST_VALUES,
    MONITORING_API,
    config_yaml,
    example_values,
    find,
    find_one,
    load_chart,
    render_chart,
    render_notes,
    worker_container,
)
from kubeflow.training.api_client import ApiClient
from kubeflow.training.utils.utils import FakeResponse

from rsdino.config.loader import load_config

CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "crds"
KUBE_VERSIONS = [f"1.{minor}.0" for minor in range(29, 37)]
CRD_KINDS = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ALL_MONITORING_ON = {
    "metrics": {
        "podMonitor": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    }
}
S3_ELASTIC = {
    "worker": {"replicas": 2},
    "elastic": {"minReplicas": 1, "maxReplicas": 4},
    "checkpoint": {"uri": "s3://bucket/ckpt"},
}
EVERYTHING_SET = {
    "image": {"repository": "registry.example/rsdino", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "data": {"uri": "s3://bucket/sen12ms"},
    "checkpoint": {"uri": "s3://bucket/ckpt"},
    "s3": {
        "endpoint": "http://minio.storage:9000",
        "region": "us-east-1",
        "pathStyle": True,
        "credentialsSecret": "rsdino-s3",
    },
    "worker": {
        "replicas": 2,
        "resources": {"gpus": 4, "cpu": "16", "cpuLimit": "32", "memory": "128Gi"},
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
        "nodeSelector": {"node.kubernetes.io/instance-type": "p4d.24xlarge"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {
                                "matchLabels": {"app.kubernetes.io/instance": "rsdino"}
                            },
                        },
                    }
                ]
            }
        },
        "priorityClassName": "training-high",
        "podAnnotations": {"example.com/team": "eo"},
        "podLabels": {"team": "eo"},
    },
    "elastic": {"minReplicas": 2, "maxReplicas": 4},
    "runPolicy": {"ttlSecondsAfterFinished": 3600, "activeDeadlineSeconds": 86400},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}},
    "networkPolicy": {
        "extraEgress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
        "extraIngress": [{"from": [{"podSelector": {"matchLabels": {"app": "debug"}}}]}],
    },
    "metrics": {"dashboard": {"namespace": "grafana", "annotations": {"grafana_folder": "ML"}}},
}

# name -> (values, render keyword arguments)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "default-bare-cluster": ({}, {"api_versions": ()}),
    "monitoring-forced-bare-cluster": (ALL_MONITORING_ON, {"api_versions": ()}),
    "monitoring-off": (
        {
            "metrics": {
                "podMonitor": {"enabled": False},
                "prometheusRule": {"enabled": False},
                "dashboard": {"enabled": False},
            }
        },
        {},
    ),
    "metrics-disabled": (
        {"metrics": {"enabled": False, "podMonitor": {"enabled": "auto"}}},
        {},
    ),
    "sen12ms-multimodal-elastic": (example_values("sen12ms-multimodal-elastic"), {}),
    "satlas-s2-single-node": (example_values("satlas-s2-single-node"), {}),
    "cpu-emulation": (CPU_TEST_VALUES, {}),
    "volcano": (
        {
            **S3_ELASTIC,
            "scheduling": {
                "gangScheduler": "volcano",
                "queue": "training",
                "priorityClass": "high",
                "scheduleTimeoutSeconds": 600,
            },
        },
        {},
    ),
    "kueue": (
        {**S3_ELASTIC, "scheduling": {"gangScheduler": "kueue", "queue": "team-a"}},
        {},
    ),
    "servicemonitor": (
        {"metrics": {"podMonitor": {"enabled": False}, "serviceMonitor": {"enabled": "auto"}}},
        {},
    ),
    "pvc-checkpoints-and-data": (
        {
            **S3_ELASTIC,
            "checkpoint": {"persistentVolumeClaim": "ckpt-rwx"},
            "data": {"persistentVolumeClaim": "datasets", "uri": "/data/sen12ms"},
        },
        {},
    ),
    "networkpolicy-off": ({"networkPolicy": {"enabled": False}}, {}),
    "hpa-metrics": (
        {
            **S3_ELASTIC,
            "elastic": {
                "minReplicas": 1,
                "maxReplicas": 4,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 80},
                        },
                    }
                ],
            },
        },
        {},
    ),
    "everything-set": (EVERYTHING_SET, {}),
}

EXPECTED_KINDS = {
    "default": {
        "ConfigMap",
        "NetworkPolicy",
        "PodMonitor",
        "PrometheusRule",
        "PyTorchJob",
        "ServiceAccount",
    },
    "default-bare-cluster": {"ConfigMap", "NetworkPolicy", "PyTorchJob", "ServiceAccount"},
    "monitoring-forced-bare-cluster": {
        "ConfigMap",
        "NetworkPolicy",
        "PodMonitor",
        "PrometheusRule",
        "PyTorchJob",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    },
    "monitoring-off": {"ConfigMap", "NetworkPolicy", "PyTorchJob", "ServiceAccount"},
    "metrics-disabled": {
        "ConfigMap",
        "NetworkPolicy",
        "PrometheusRule",
        "PyTorchJob",
        "ServiceAccount",
    },
    "servicemonitor": {
        "ConfigMap",
        "NetworkPolicy",
        "PrometheusRule",
        "PyTorchJob",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    },
    "networkpolicy-off": {
        "ConfigMap",
        "PodMonitor",
        "PrometheusRule",
        "PyTorchJob",
        "ServiceAccount",
    },
}


@functools.cache
def rendered(case: str) -> tuple[dict[str, Any], ...]:
    values, kwargs = CASES[case]
    return tuple(render_chart(copy.deepcopy(values), **kwargs))


def job_of(case: str) -> dict[str, Any]:
    return find_one(rendered(case), "PyTorchJob")


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


# --- rendering and lint -------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_case_renders_one_job_and_its_config(case: str) -> None:
    objects = rendered(case)
    job = find_one(objects, "PyTorchJob")
    kinds = {obj["kind"] for obj in objects}
    if case in EXPECTED_KINDS:
        assert kinds == EXPECTED_KINDS[case]
    config_map = next(c for c in find(objects, "ConfigMap") if "config.yaml" in c["data"])
    assert config_map["metadata"]["name"] == f"{job['metadata']['name']}-config"
    names = [(obj["kind"], obj["metadata"]["name"]) for obj in objects]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_monitoring_objects_follow_the_cluster_unless_forced() -> None:
    def kinds(case: str) -> set[str]:
        return {obj["kind"] for obj in rendered(case)}

    monitoring = {"PodMonitor", "PrometheusRule"}
    assert monitoring <= kinds("default")
    assert not monitoring & kinds("default-bare-cluster")
    assert monitoring | {"ServiceMonitor", "Service"} <= kinds("monitoring-forced-bare-cluster")
    assert not monitoring & kinds("monitoring-off")
    # auto with the API present, false without it: the dashboard follows the same switch
    assert any("rsdino.json" in c["data"] for c in find(rendered("default"), "ConfigMap"))
    assert not any(
        "rsdino.json" in c["data"] for c in find(rendered("default-bare-cluster"), "ConfigMap")
    )
    assert "PodMonitor" not in kinds("metrics-disabled")  # nothing to scrape


@pytest.mark.parametrize(
    "values",
    [
        {},
        ALL_MONITORING_ON,
        example_values("sen12ms-multimodal-elastic"),
        example_values("satlas-s2-single-node"),
    ],
    ids=["default", "monitoring-forced", "sen12ms-multimodal-elastic", "satlas-s2-single-node"],
)
@pytest.mark.parametrize("kube_version", ["v1.29.0", "v1.36.0"])
def test_helm_lint_strict_is_clean(values: dict[str, Any], kube_version: str) -> None:
    report = helm_python.lint(CHART_DIR, values, strict=True, kube_version=kube_version)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_lint_strict_is_clean_for_every_case(case: str) -> None:
    values = copy.deepcopy(CASES[case][0])
    report = helm_python.lint(CHART_DIR, values, strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_chart_metadata() -> None:
    """Helm's offline render does not enforce kubeVersion, so the constraint itself is checked."""
    metadata = load_chart().metadata
    assert metadata["apiVersion"] == "v2" and metadata["name"] == "rsdino-pretrain"
    assert metadata["version"] == "0.1.0" and metadata["appVersion"] == "0.1.0"
    assert metadata["kubeVersion"] == ">=1.29.0-0"
    assert load_chart().schema is not None


# --- values schema and fail guards --------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"worker": {"replicaz": 2}}, "at '/worker': additional properties 'replicaz'"),
        (
            {"metrics": {"podMonitor": {"enable": True}}},
            "at '/metrics/podMonitor': additional properties 'enable'",
        ),
        ({"worker": {"replicas": "two"}}, "at '/worker/replicas': got string, want integer"),
        ({"worker": {"replicas": -1}}, "at '/worker/replicas': minimum: got -1"),
        ({"worker": {"restartPolicy": "Sometimes"}}, "at '/worker/restartPolicy': value must be"),
        ({"runPolicy": {"cleanPodPolicy": "Some"}}, "at '/runPolicy/cleanPodPolicy'"),
        ({"metrics": {"podMonitor": {"enabled": "yes"}}}, "at '/metrics/podMonitor/enabled'"),
        ({"checkpoint": {"uri": "/mnt/ckpt"}}, "at '/checkpoint/uri'"),
        ({"data": {"uri": "/mnt/data"}}, "at '/data/uri'"),
        ({"training": {"outputDir": "/output"}}, "at '/training/outputDir'"),
        ({"worker": {"resources": {"memory": "lots"}}}, "at '/worker/resources/memory'"),
        ({"s3": {"credentialsSecret": {"key": "AKIA..."}}}, "at '/s3/credentialsSecret'"),
        ({"s3": {"accessKey": "AKIA..."}}, "at '/s3': additional properties 'accessKey'"),
        (
            {"worker": {"env": [{"name": "NCCL_DEBUG", "vaule": "INFO"}]}},
            "at '/worker/env/0': additional properties 'vaule'",
        ),
        ({"elastic": {"maxReplicas": 0}}, "at '/elastic/maxReplicas'"),
        ({"fullnameOverride": "Bad_Name"}, "at '/fullnameOverride'"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(message)):
        load_chart().validate_schema(load_chart().merge_values(values))
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(message)):
        render_chart(values)


def test_schema_accepts_every_case() -> None:
    chart = load_chart()
    for values, _ in CASES.values():
        chart.validate_schema(chart.merge_values(copy.deepcopy(values)))


@pytest.mark.parametrize(
    ("values", "release", "message"),
    [
        ({"elastic": {"minReplicas": 3, "maxReplicas": 2}}, "rsdino", "minReplicas (3) is greater"),
        (
            {**S3_ELASTIC, "worker": {"replicas": 5}},
            "rsdino",
            "worker.replicas (5) must lie between",
        ),
        ({"elastic": {"maxReplicas": 2}}, "rsdino", "every rank must read the same checkpoints"),
        (
            {"checkpoint": {"uri": "s3://bucket/c", "persistentVolumeClaim": "ckpt"}},
            "rsdino",
            "checkpoint.uri or checkpoint.persistentVolumeClaim, not both",
        ),
        ({"worker": {"resources": {"gpus": 0}}}, "rsdino", "worker.nprocPerNode must be set"),
        ({"worker": {"nprocPerNode": 4}}, "rsdino", "nprocPerNode (4) must equal"),
        (
            {"worker": {"terminationGracePeriodSeconds": 30, "shutdownMarginSeconds": 30}},
            "rsdino",
            "terminationGracePeriodSeconds (30) must be longer",
        ),
        ({}, "a-release-name-that-is-much-too-long-for-pod-names", "has 50 characters"),
        ({}, "1st", "not a DNS-1035 label"),
        ({"data": {"uri": "/data/x"}}, "rsdino", "set data.persistentVolumeClaim"),
        (
            {"data": {"uri": "s3://bucket/d", "persistentVolumeClaim": "datasets"}},
            "rsdino",
            "use one of them",
        ),
        ({"metrics": {"port": 23450}}, "rsdino", "include 23456"),
        (
            {"worker": {"env": [{"name": "PET_NNODES", "value": "2"}]}},
            "rsdino",
            "worker.env sets PET_NNODES",
        ),
        (
            {"training": {"overrides": {"checkpoint": {"dir": "/tmp/x"}}}},
            "rsdino",
            "training.overrides sets checkpoint.dir",
        ),
        (
            {"training": {"overrides": {"train": {"dataset": {"uri": "s3://x"}}}}},
            "rsdino",
            "training.overrides sets train.dataset.uri",
        ),
        ({"scheduling": {"gangScheduler": "kueue"}}, "rsdino", "needs scheduling.queue"),
        ({"scheduling": {"queue": "q"}}, "rsdino", "need scheduling.gangScheduler"),
        (
            {"elastic": {"metrics": [{"type": "Resource"}]}},
            "rsdino",
            "nothing to scale",
        ),
        (
            {"metrics": {"enabled": False, "podMonitor": {"enabled": True}}},
            "rsdino",
            "nothing to scrape",
        ),
    ],
)
def test_fail_guards(values: dict[str, Any], release: str, message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render_chart(values, release=release)


def test_fullname_of_a_long_release_is_truncated_to_a_dns_label() -> None:
    release = "team-eo-sen12ms-pretrain-run-2025"
    job = find_one(render_chart({}, release=release), "PyTorchJob")
    name = job["metadata"]["name"]
    assert len(name) <= 40 and DNS_1035.match(name) and name.startswith(release)
    assert len(f"{name}-worker-999") <= 63


# --- schemas: Kubernetes core kinds, CRDs, operator SDK -----------------------------------


def _objects_of_all_cases() -> list[tuple[str, dict[str, Any]]]:
    return [(case, obj) for case in sorted(CASES) for obj in rendered(case)]


def _pod_of(job: dict[str, Any]) -> dict[str, Any]:
    """The Worker pod template as the Pod the operator creates from it."""
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    metadata = {**template["metadata"], "name": f"{job['metadata']['name']}-worker-0"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_core_objects_validate_strictly(kube_version: str) -> None:
    seen: set[str] = set()
    for case, obj in _objects_of_all_cases():
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            if obj["kind"] != "PyTorchJob":
                continue
            obj = _pod_of(obj)  # the pod template is core API: check it as a Pod
        key = json.dumps(obj, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{case}: {obj['kind']} {obj['metadata']['name']} on {kube_version}: {exc}")
        # SchemaNotFoundError propagates: a core kind without a schema fails the test


def test_strict_core_validation_rejects_a_misspelt_pod_field() -> None:
    pod = _pod_of(copy.deepcopy(job_of("default")))
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFS"):
        kubernetes_validate.validate(pod, KUBE_VERSIONS[-1], strict=True)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected: additionalProperties false wherever
    properties are listed and the schema does not preserve unknown fields itself."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in strict
        and "additionalProperties" not in strict
        and not strict.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


# Top-level metadata is untyped in CRD schemas (the API server checks it as ObjectMeta): this is
# the part of ObjectMeta a chart may set.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_1035.pattern, "maxLength": 63},
        "namespace": {"type": "string", "pattern": DNS_1035.pattern},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRD_DIR / CRD_KINDS[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = _strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "spec"})
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    return jsonschema.Draft7Validator(schema)


def test_custom_resources_validate_against_strict_crd_schemas() -> None:
    checked: set[str] = set()
    for case, obj in _objects_of_all_cases():
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            continue
        errors = list(crd_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj))
        assert not errors, f"{case}: {obj['kind']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )
        checked.add(obj["kind"])
    assert checked == {kind for _, kind in CRD_KINDS}


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("spec",), "elasticPolicyy"),
        (("spec", "elasticPolicy"), "rdzvTimeout"),
        (("spec", "pytorchReplicaSpecs", "Worker", "template", "spec"), "restartPolicyy"),
        (("metadata",), "uid"),
    ],
)
def test_strict_crd_schema_rejects_unknown_fields(path: tuple[str, ...], field: str) -> None:
    job = copy.deepcopy(job_of("default"))
    node = job
    for key in path:
        node = node[key]
    node[field] = "x"
    assert not crd_validator("kubeflow.org/v1", "PyTorchJob").is_valid(job)


def _quantities_as_strings(obj: Any) -> Any:
    """The SDK models keep resource quantities as strings (8 -> "8")."""
    if isinstance(obj, dict):
        return {k: _quantities_as_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_quantities_as_strings(v) for v in obj]
    return obj


@pytest.mark.parametrize(
    "case", ["default", "sen12ms-multimodal-elastic", "hpa-metrics", "volcano"]
)
def test_pytorchjob_round_trips_through_the_kubeflow_sdk_models(case: str) -> None:
    job = copy.deepcopy(job_of(case))
    # kubeflow-training 1.9's ElasticPolicy.metrics names a model the SDK does not ship
    # (K8sIoApiAutoscalingV2MetricSpec), so HPA metrics are checked by the CRD schema only.
    job["spec"]["elasticPolicy"].pop("metrics", None)
    client = ApiClient()
    model = client.deserialize(FakeResponse(job), "KubeflowOrgV1PyTorchJob")
    elastic = model.spec.elastic_policy
    assert elastic.rdzv_backend == "c10d"
    assert (elastic.min_replicas, elastic.max_replicas) == (
        job["spec"]["elasticPolicy"]["minReplicas"],
        job["spec"]["elasticPolicy"]["maxReplicas"],
    )
    assert [(c.key, c.value) for c in elastic.rdzv_conf] == [
        (c["key"], c["value"]) for c in job["spec"]["elasticPolicy"]["rdzvConf"]
    ]
    assert model.spec.nproc_per_node == job["spec"]["nprocPerNode"]
    assert model.spec.run_policy.backoff_limit == job["spec"]["runPolicy"]["backoffLimit"]
    worker = model.spec.pytorch_replica_specs["Worker"]
    assert worker.template.spec.containers[0].name == "pytorch"
    # The deserializer drops what the models do not know: an equal round trip means no field
    # of the rendered job is lost on its way through the operator's types.
    expected = json.loads(json.dumps(job))
    for resources in (c["resources"] for c in pod_spec(expected)["containers"]):
        for part in resources.values():
            part.update({k: str(v) for k, v in part.items()})
    assert client.sanitize_for_serialization(model) == expected


# --- what the schemas miss ----------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_job_follows_the_operator_contract(case: str) -> None:
    job = job_of(case)
    name = job["metadata"]["name"]
    assert DNS_1035.match(name) and len(name) <= 40
    spec = job["spec"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}
    elastic = spec["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d" and elastic["rdzvId"]
    assert {c["key"] for c in elastic["rdzvConf"]} >= {"join_timeout", "last_call_timeout"}
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert elastic["minReplicas"] <= worker["replicas"] <= elastic["maxReplicas"]
    containers = pod_spec(job)["containers"]
    assert [c["name"] for c in containers] == ["pytorch"]
    container = containers[0]
    assert container["command"] == ["rsdino-torchrun"]
    args = container["args"]
    assert args[:7] == [
        "-m",
        "rsdino.cli",
        "train",
        "--config",
        "/etc/rsdino/config.yaml",
        "--output-dir",
        args[6],
    ]
    assert args[6].startswith("/workspace")
    assert "metrics.host=$(POD_IP)" in args
    assert not [
        a for a in args if a.startswith(("--nnodes", "--nproc", "--rdzv", "--max-restarts"))
    ]
    env = env_of(container)
    assert not [n for n in env if n.startswith("PET_")], "PET_* belong to the operator"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["HOME"]["value"] == "/home/rsdino"
    grace = pod_spec(job)["terminationGracePeriodSeconds"]
    assert 0 < int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"]) < grace
    # volumes: the config, memory-backed /dev/shm, writable scratch on a read-only root
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    assert volumes[mounts["/etc/rsdino"]]["configMap"]["name"] == f"{name}-config"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    for path in ("/tmp", "/home/rsdino", "/workspace"):
        assert "emptyDir" in volumes[mounts[path]]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    pod_security = pod_spec(job)["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] >= 1000
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    # one metrics port per local rank, the first named "metrics", no clash with the rendezvous
    ports = container.get("ports", [])
    nproc = int(spec["nprocPerNode"])
    if ports:
        assert [p["name"] for p in ports] == ["metrics"] + [f"metrics-{r}" for r in range(1, nproc)]
        assert [p["containerPort"] for p in ports] == [
            ports[0]["containerPort"] + r for r in range(nproc)
        ]
        assert 23456 not in [p["containerPort"] for p in ports]


def test_resources_and_scheduling_settings_reach_the_pod() -> None:
    job = job_of("everything-set")
    spec = pod_spec(job)
    container = worker_container(job)
    assert container["image"] == "registry.example/rsdino:1.2.3"
    assert container["resources"] == {
        "requests": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": 4},
        "limits": {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": 4},
    }
    assert job["spec"]["nprocPerNode"] == "4"
    assert spec["nodeSelector"] == EVERYTHING_SET["worker"]["nodeSelector"]
    assert spec["tolerations"] == EVERYTHING_SET["worker"]["tolerations"]
    assert spec["affinity"] == EVERYTHING_SET["worker"]["affinity"]
    assert spec["priorityClassName"] == "training-high"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert template["metadata"]["labels"]["team"] == "eo"
    assert template["metadata"]["annotations"]["example.com/team"] == "eo"
    assert job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 3600
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 86400
    env = env_of(container)
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["AWS_REGION"]["value"] == "us-east-1"
    assert env["RSDINO_S3_PATH_STYLE"]["value"] == "1"
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    account = find_one(rendered("everything-set"), "ServiceAccount")
    assert account["metadata"]["annotations"] == EVERYTHING_SET["serviceAccount"]["annotations"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert not find(rendered("everything-set"), "Role") and not find(
        rendered("everything-set"), "RoleBinding"
    )
    dashboard = next(
        c for c in find(rendered("everything-set"), "ConfigMap") if "rsdino.json" in c["data"]
    )
    assert dashboard["metadata"]["namespace"] == "grafana"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(dashboard["data"]["rsdino.json"])["uid"] == "rsdino-pretrain"


def test_cpu_values_give_one_process_per_pod_without_gpus() -> None:
    job = job_of("cpu-emulation")
    assert job["spec"]["nprocPerNode"] == "1"
    resources = worker_container(job)["resources"]
    assert not any("gpu" in key for part in resources.values() for key in part)


def test_restart_policy_and_run_policy_of_the_elastic_example() -> None:
    job = job_of("sen12ms-multimodal-elastic")
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "ExitCode"
    assert (
        job["spec"]["elasticPolicy"]["minReplicas"],
        job["spec"]["elasticPolicy"]["maxReplicas"],
    ) == (2, 8)
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"]["backoffLimit"] == 20
    assert pod_spec(job)["terminationGracePeriodSeconds"] == 600
    assert env_of(worker_container(job))["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == "540"
    single = job_of("satlas-s2-single-node")["spec"]["elasticPolicy"]
    assert (single["minReplicas"], single["maxReplicas"]) == (1, 1)


def test_gang_scheduling_and_autoscaling_switches() -> None:
    volcano = job_of("volcano")
    assert volcano["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 1,
        "queue": "training",
        "priorityClass": "high",
        "scheduleTimeoutSeconds": 600,
    }
    assert pod_spec(volcano)["schedulerName"] == "volcano"
    kueue = job_of("kueue")
    assert kueue["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "schedulingPolicy" not in kueue["spec"]["runPolicy"]
    assert "schedulerName" not in pod_spec(kueue)
    assert "schedulingPolicy" not in job_of("default")["spec"]["runPolicy"]
    assert job_of("hpa-metrics")["spec"]["elasticPolicy"]["metrics"][0]["type"] == "Resource"
    assert "metrics" not in job_of("default")["spec"]["elasticPolicy"]


def test_checkpoint_and_data_claims_are_mounted_and_configured() -> None:
    job = job_of("pvc-checkpoints-and-data")
    container = worker_container(job)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]
        for v in pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims[mounts["/checkpoints"]["name"]]["claimName"] == "ckpt-rwx"
    assert claims[mounts["/data"]["name"]] == {"claimName": "datasets", "readOnly": True}
    config = yaml.safe_load(config_yaml(rendered("pvc-checkpoints-and-data")))
    assert config["checkpoint"]["dir"] == "/checkpoints/rsdino"
    assert config["train"]["dataset"]["uri"] == "/data/sen12ms"


def test_rdzv_id_differs_between_releases_and_namespaces() -> None:
    ids = {
        find_one(render_chart({}, release=release, namespace=namespace), "PyTorchJob")["spec"][
            "elasticPolicy"
        ]["rdzvId"]
        for release, namespace in [("a", "ml"), ("b", "ml"), ("a", "research"), ("a-b", "ml")]
    }
    assert len(ids) == 4 and "none" not in ids


def test_config_checksum_annotation_follows_the_config() -> None:
    def checksum(values: dict[str, Any]) -> str:
        job = find_one(render_chart(values), "PyTorchJob")
        value: str = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"][
            "annotations"
        ]["checksum/config"]
        return value

    base = checksum({})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({}) == base
    assert checksum({"training": {"overrides": {"optim": {"epochs": 50}}}}) != base
    assert checksum({"timeouts": {"collectiveSeconds": 120}}) != base
    assert checksum({"worker": {"podLabels": {"x": "y"}}}) == base  # not part of the config


@pytest.mark.parametrize(
    "case",
    [
        "default",
        "sen12ms-multimodal-elastic",
        "satlas-s2-single-node",
        "cpu-emulation",
        "pvc-checkpoints-and-data",
        "everything-set",
    ],
)
def test_configmap_is_a_valid_rsdino_config(case: str, tmp_path: Path) -> None:
    objects = rendered(case)
    values = CASES[case][0]
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(objects))
    cfg = load_config(str(path))
    job = find_one(objects, "PyTorchJob")
    merged = load_chart().merge_values(copy.deepcopy(values))
    assert cfg.metrics.port == merged["metrics"]["port"]
    assert cfg.metrics.enabled == merged["metrics"]["enabled"]
    assert cfg.metrics.job == job["metadata"]["name"]
    assert cfg.train.collective_timeout_s == merged["timeouts"]["collectiveSeconds"]
    data_uri = merged["data"]["uri"] or ("/data" if merged["data"]["persistentVolumeClaim"] else "")
    assert cfg.train.dataset.uri == data_uri
    if merged["checkpoint"]["uri"]:
        assert cfg.checkpoint.dir == merged["checkpoint"]["uri"]

    def assert_holds(expected: dict[str, Any], actual: Any, prefix: str) -> None:
        for key, value in expected.items():
            if isinstance(value, dict):
                assert_holds(value, actual[key], f"{prefix}{key}.")
            else:
                assert actual[key] == value, f"override {prefix}{key}"

    assert_holds(merged["training"]["overrides"], cfg, "")


def test_example_presets_select_their_models() -> None:
    text = config_yaml(rendered("sen12ms-multimodal-elastic"))
    assert yaml.safe_load(text)["base"] == "vitl16_short_multimodal"
    assert (
        yaml.safe_load(config_yaml(rendered("satlas-s2-single-node")))["base"] == "vitl16_short_s2"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_secrets_only_by_reference(case: str) -> None:
    objects = rendered(case)
    assert not find(objects, "Secret")
    for item in worker_container(job_of(case)).get("env", []):
        if item["name"].startswith("AWS_") and item["name"] not in (
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
        ):
            assert "value" not in item and "secretKeyRef" in item["valueFrom"], item
    text = json.dumps(objects)
    assert 'AWS_SECRET_ACCESS_KEY", "value"' not in text


def test_credentials_secret_is_referenced_by_name() -> None:
    env = env_of(worker_container(job_of("sen12ms-multimodal-elastic")))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "rsdino-s3", "key": key}
    assert "AWS_ACCESS_KEY_ID" not in env_of(worker_container(job_of("default")))


# --- labels, monitoring and network -------------------------------------------------------


def test_standard_labels_and_selectors() -> None:
    for case in ("default", "monitoring-forced-bare-cluster"):
        for obj in rendered(case):
            labels = obj["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "rsdino-pretrain"
            assert labels["app.kubernetes.io/instance"] == "rsdino"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["app.kubernetes.io/version"] == "0.1.0"
            assert labels["helm.sh/chart"] == "rsdino-pretrain-0.1.0"
            assert labels["app.kubernetes.io/component"]
    job = job_of("default")
    pod_labels = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    monitor = find_one(rendered("default"), "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert "app.kubernetes.io/version" not in selector and "helm.sh/chart" not in selector
    service = find_one(rendered("servicemonitor"), "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    service_monitor = find_one(rendered("servicemonitor"), "ServiceMonitor")
    assert (
        service_monitor["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
    )
    assert [p["name"] for p in service["spec"]["ports"]] == [
        e["port"] for e in service_monitor["spec"]["endpoints"]
    ]


def test_pod_monitor_scrapes_every_rank_port_with_rsdino_job_labels() -> None:
    job = job_of("default")
    ports = [p["name"] for p in worker_container(job)["ports"]]
    monitor = find_one(rendered("default"), "PodMonitor")
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == ports and len(ports) == 8
    assert all(e["honorLabels"] and e["path"] == "/metrics" for e in endpoints)
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


def test_monitoring_labels_are_configurable() -> None:
    objects = rendered("sen12ms-multimodal-elastic")
    for kind in ("PodMonitor", "PrometheusRule"):
        assert find_one(objects, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_carries_the_chart_rule_file() -> None:
    rule = find_one(rendered("default"), "PrometheusRule")
    shipped = yaml.safe_load((CHART_DIR / "rules" / "rsdino-alerts.yaml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]


def test_network_policy_allows_what_training_needs() -> None:
    policy = find_one(rendered("default"), "NetworkPolicy")
    spec = policy["spec"]
    pod_labels = job_of("default")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"][
        "labels"
    ]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    peers = [rule for rule in spec["ingress"] if "ports" not in rule]
    assert peers and peers[0]["from"][0]["podSelector"] == spec["podSelector"]
    scrape = next(rule for rule in spec["ingress"] if "ports" in rule)
    assert scrape["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
    }
    metric_ports = [p["containerPort"] for p in worker_container(job_of("default"))["ports"]]
    assert [p["port"] for p in scrape["ports"]] == metric_ports
    dns = next(rule for rule in spec["egress"] if "to" not in rule)
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert any(rule.get("to") == [{"podSelector": spec["podSelector"]}] for rule in spec["egress"])
    store = next(rule for rule in spec["egress"] if rule.get("to", [{}])[0].get("ipBlock"))
    assert store["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    assert sorted(p["port"] for p in store["ports"]) == [80, 443]
    extra = find_one(rendered("everything-set"), "NetworkPolicy")["spec"]
    assert {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]} in extra["egress"]
    assert EVERYTHING_SET["networkPolicy"]["extraIngress"][0] in extra["ingress"]


def test_notes_tell_how_to_watch_the_job() -> None:
    notes = render_notes({})
    assert "kubectl -n ml get pytorchjobs rsdino-rsdino-pretrain -w" in notes
    assert "kubectl -n ml logs -f rsdino-rsdino-pretrain-worker-0 -c pytorch" in notes
    assert "rsdino-rsdino-pretrain-dashboard" in notes
    assert "143" in notes and "200" in notes
    bare = render_notes({}, api_versions=())
    assert "No dashboard ConfigMap" in bare
    assert MONITORING_API in bare


# --- values.yaml documents every key ------------------------------------------------------


def _schema_paths(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    paths: set[tuple[str, ...]] = set()
    for key, sub in schema.get("properties", {}).items():
        paths.add((*prefix, key))
        paths |= _schema_paths(sub, (*prefix, key))
    return paths


def test_values_file_holds_and_comments_every_schema_key() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    declared = _schema_paths(schema)
    assert all(
        node.get("additionalProperties") is False
        for node in _object_nodes(schema)
        if "properties" in node
    )
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    found: set[tuple[str, ...]] = set()
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z_][\w./-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
        path = tuple(k for _, k in stack)
        if path not in declared:
            continue
        found.add(path)
        previous = lines[number - 1].strip()
        assert previous.startswith("#"), f"values.yaml line {number + 1}: {path} has no comment"
    assert found == declared, f"schema keys missing from values.yaml: {declared - found}"


def _object_nodes(schema: Any) -> list[dict[str, Any]]:
    if isinstance(schema, list):
        return [n for item in schema for n in _object_nodes(item)]
    if not isinstance(schema, dict):
        return []
    nodes = [schema] if schema.get("type") == "object" else []
    for value in schema.values():
        nodes.extend(_object_nodes(value))
    return nodes
