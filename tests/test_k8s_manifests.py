"""The cluster prerequisites under k8s/ and the real-cluster smoke test script.

Without a cluster `kubectl create --dry-run=client` cannot map kinds (it asks the API server),
so the manifests are built with `kubectl kustomize` (offline) when kubectl is here and validated
against the Kubernetes 1.29-1.36 schemas in strict mode. The smoke script cannot run here: it
is checked with bash -n and ShellCheck, run for its argument handling, and its Helm values are
rendered through the chart and its grep patterns matched against a real training run's log.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import TINY_OVERRIDES, train_command
from helm_chart import CHART_DIR, example_values, find_one, render_chart, worker_container

from rsdino.config.loader import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
SMOKE = K8S_DIR / "smoke-test.sh"
CRD_DIR = REPO_ROOT.parent / "shared" / "schemas" / "crds"
KUBE_VERSIONS = [f"1.{minor}.0" for minor in range(29, 37)]
ELASTIC_EXAMPLE = "sen12ms-multimodal-elastic"


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def kustomize_objects() -> list[dict[str, Any]]:
    """What `kubectl apply -k k8s/` creates: the files the kustomization lists."""
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, (
        "the kustomization transforms its resources: compare with `kubectl kustomize` output"
    )
    return [doc for name in kustomization["resources"] for doc in load_docs(K8S_DIR / name)]


def secret_example() -> dict[str, Any]:
    (secret,) = load_docs(K8S_DIR / "s3-secret.example.yaml")
    return secret


def quantity(value: str | int) -> Decimal:
    """A Kubernetes resource quantity as a number (cores, bytes, counts)."""
    suffixes = {
        "m": Decimal("0.001"),
        "k": Decimal(10) ** 3,
        "M": Decimal(10) ** 6,
        "G": Decimal(10) ** 9,
        "T": Decimal(10) ** 12,
        "Ki": Decimal(2) ** 10,
        "Mi": Decimal(2) ** 20,
        "Gi": Decimal(2) ** 30,
        "Ti": Decimal(2) ** 40,
    }
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and (match[2] in suffixes or not match[2]), f"unsupported quantity {value!r}"
    return Decimal(match[1]) * suffixes.get(match[2], Decimal(1))


# ---- namespace, quota, Secret example ----


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_are_valid_kubernetes_objects(kube_version: str) -> None:
    """Strict: an unknown field fails, and so does a kind without a schema."""
    for obj in [*kustomize_objects(), secret_example()]:
        kubernetes_validate.validate(obj, kube_version, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The validation above can fail: a misspelt field is an error."""
    quota = next(o for o in kustomize_objects() if o["kind"] == "ResourceQuota")
    broken = {**quota, "spec": {**quota["spec"], "hardd": {"pods": "1"}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_same_objects() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    objects = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert sorted(objects, key=key) == sorted(kustomize_objects(), key=key)


def test_everything_lives_in_the_ml_namespace() -> None:
    (namespace,) = [o for o in kustomize_objects() if o["kind"] == "Namespace"]
    name = namespace["metadata"]["name"]
    assert name == "ml"
    for obj in [*kustomize_objects(), secret_example()]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == name, obj["metadata"]["name"]
    assert secret_example() not in kustomize_objects(), "the placeholder Secret must not be applied"


def test_quota_limits_gpus_cpu_memory_and_pods() -> None:
    (quota,) = [o for o in kustomize_objects() if o["kind"] == "ResourceQuota"]
    hard = quota["spec"]["hard"]
    for key in ("requests.nvidia.com/gpu", "requests.cpu", "requests.memory", "pods"):
        assert key in hard, f"the quota does not limit {key}"
        assert quantity(hard[key]) > 0


def test_quota_fits_the_elastic_example_at_its_largest() -> None:
    """The quota must admit the elastic example at maxReplicas, or scaling up stalls at the
    quota with pods that never get created."""
    (quota,) = [o for o in kustomize_objects() if o["kind"] == "ResourceQuota"]
    hard = quota["spec"]["hard"]
    objects = render_chart(example_values(ELASTIC_EXAMPLE))
    job = find_one(objects, "PyTorchJob")
    pods = job["spec"]["elasticPolicy"]["maxReplicas"]
    requests = worker_container(job)["resources"]["requests"]
    gpu_name = next(k for k in requests if k not in {"cpu", "memory"})
    assert pods * quantity(requests[gpu_name]) <= quantity(hard[f"requests.{gpu_name}"])
    assert pods * quantity(requests["cpu"]) <= quantity(hard["requests.cpu"])
    assert pods * quantity(requests["memory"]) <= quantity(hard["requests.memory"])
    assert pods <= quantity(hard["pods"])


def test_secret_example_holds_placeholders_for_the_keys_the_chart_reads() -> None:
    secret = secret_example()
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "rsdino-s3"
    assert secret["stringData"] == {
        "AWS_ACCESS_KEY_ID": "REPLACE_ME",
        "AWS_SECRET_ACCESS_KEY": "REPLACE_ME",
    }
    assert "data" not in secret
    # The chart's credential env reads exactly these keys from the named Secret.
    job = find_one(render_chart({"s3": {"credentialsSecret": "rsdino-s3"}}), "PyTorchJob")
    refs = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in worker_container(job)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == set(secret["stringData"])
    assert "kubectl create secret generic rsdino-s3" in (K8S_DIR / "README.md").read_text()


def test_readme_names_only_files_that_exist() -> None:
    readme = (K8S_DIR / "README.md").read_text()
    named = set(re.findall(r"`((?:k8s/|docker/|values/)[\w./-]+\.(?:yaml|sh|md))`", readme))
    assert named, "the README names no files"
    for name in named:
        path = K8S_DIR / name if name.startswith("values/") else REPO_ROOT / name
        assert path.is_file(), f"k8s/README.md names {name}, which does not exist"
    assert "ref=v1.9." in readme, "the operator install must be pinned to a v1.9 release"


# ---- smoke-test.sh: static checks and argument handling ----


def test_smoke_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(SMOKE, os.X_OK), "k8s/smoke-test.sh is not executable"
    assert "set -euo pipefail" in SMOKE.read_text()


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (apt-get install -y shellcheck)",
)
def test_smoke_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(SMOKE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def run_smoke(*args: str) -> subprocess.CompletedProcess[str]:
    """The script with an empty PATH besides bash's basics: argument errors must come first,
    before it looks for kubectl or touches a cluster."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["bash", str(SMOKE), *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_smoke_script_help() -> None:
    result = run_smoke("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: k8s/smoke-test.sh")
    for option in ("--pvc", "--s3", "--image", "--timeout", "--keep"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "checkpoint storage missing"),
        (("--pvc", "a", "--s3", "s3://b/c"), "not both"),
        (("--s3", "/not/s3"), "s3:// URI"),
        (("--pvc", "a", "--timeout", "soon"), "positive integer"),
        (("--pvc", "a", "--release", "Bad_Name"), "DNS-1035"),
        (("--pvc", "a", "--image", "no-tag"), "REPO:TAG"),
        (("--pvc", "a", "--bogus"), "unknown argument: --bogus"),
    ],
)
def test_smoke_script_rejects_bad_arguments(args: tuple[str, ...], message: str) -> None:
    result = run_smoke(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Usage:" in result.stderr


# ---- smoke-test.sh: its values and log patterns against the chart and the trainer ----

# A value for every shell variable the script's values heredocs use.
SMOKE_VARIABLES = {
    "pvc": "rsdino-checkpoints",
    "s3_uri": "s3://bucket/smoke/",
    "release": "rsdino-smoke-abc123",
    "s3_endpoint": "http://minio.minio:9000",
    "s3_path_style": "true",
    "s3_secret": "rsdino-s3",
    "image_repository": "registry.example:5000/rsdino",
    "image_tag": "0.1.0",
}


def smoke_values_pieces() -> list[dict[str, Any]]:
    """The script's `<<VALUES` heredocs, with its variables filled in."""
    text = SMOKE.read_text()
    pieces = re.findall(r"<<VALUES\n(.*?)\nVALUES\n", text, re.S)
    assert len(pieces) >= 3, "expected the base values and the PVC and S3 pieces"

    def fill(match: re.Match[str]) -> str:
        name = match[1]
        assert name in SMOKE_VARIABLES, f"the values use ${name}: add it to SMOKE_VARIABLES"
        value = SMOKE_VARIABLES[name]
        return value.rstrip("/") if match[2] == "%/" else value

    return [yaml.safe_load(re.sub(r"\$\{(\w+)(%/)?\}", fill, piece)) for piece in pieces]


def smoke_values(storage: str) -> dict[str, Any]:
    """The values the script installs with `--pvc` or `--s3` (and `--image`)."""
    base, *pieces = smoke_values_pieces()
    values = dict(base)
    for piece in pieces:
        is_pvc = "persistentVolumeClaim" in piece.get("checkpoint", {})
        is_s3 = "uri" in piece.get("checkpoint", {})
        if (is_pvc and storage != "pvc") or (is_s3 and storage != "s3"):
            continue
        assert not set(piece) & set(values), "a values piece overwrites another"
        values.update(piece)
    return values


def leaf_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path != "training.overrides":
            paths += leaf_paths(value, f"{path}.")
        else:
            paths.append(path)
    return paths


@pytest.mark.parametrize("storage", ["pvc", "s3"])
def test_smoke_values_use_only_chart_keys(storage: str) -> None:
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for path in leaf_paths(smoke_values(storage)):
        node: Any = chart_values
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f"{path} is not in the chart's values"
            node = node[key]


@pytest.mark.parametrize("storage", ["pvc", "s3"])
def test_smoke_values_render_a_tiny_elastic_cpu_job(storage: str, tmp_path: Path) -> None:
    """The chart accepts the script's values, and the job they make is what the script expects:
    2 CPU pods, elastic 1:2, found by the release label, long enough to lose a pod mid-run."""
    release = SMOKE_VARIABLES["release"]
    objects = render_chart(smoke_values(storage), release=release, namespace="ml")
    job = find_one(objects, "PyTorchJob")
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == release
    spec = job["spec"]
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert (spec["elasticPolicy"]["minReplicas"], spec["elasticPolicy"]["maxReplicas"]) == (1, 2)
    assert str(spec["nprocPerNode"]) == "1"
    requests = worker_container(job)["resources"]["requests"]
    assert set(requests) == {"cpu", "memory"}, "the smoke job must not ask for GPUs"
    config_map = next(c for c in objects if "config.yaml" in c.get("data", {}))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_map["data"]["config.yaml"])
    config = load_config(str(config_file))
    assert config.train.device == "cpu"
    steps = config.optim.epochs * config.train.OFFICIAL_EPOCH_LENGTH
    assert steps >= 8 * config.checkpoint.every_steps, (
        "the run must outlast several checkpoints: one before the pod loss, more after it"
    )
    if storage == "s3":
        assert config.checkpoint.dir == f"s3://bucket/smoke/{release}"


def smoke_pattern(name: str) -> str:
    match = re.search(rf"^{name}='([^']+)'$", SMOKE.read_text(), re.M)
    assert match, f"{name}= is not in the smoke script"
    return match[1]


def test_smoke_log_patterns_match_a_real_run(tmp_path: Path) -> None:
    """The script waits for grep -E patterns in the pods' logs: run the trainer twice (the
    second start resumes) and grep its real output with the script's patterns."""
    command = train_command(tmp_path / "run", *TINY_OVERRIDES, "optim.epochs=1")
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    for pattern, output in (
        (smoke_pattern("checkpoint_line"), first.stdout),
        (smoke_pattern("resumed_line"), second.stdout),
    ):
        found = subprocess.run(
            ["grep", "-Eo", "--", pattern], input=output, text=True, capture_output=True
        )
        assert found.returncode == 0, f"{pattern!r} matches no line of:\n{output}"
    steps = re.findall(r"step_0*(\d+)", first.stdout)
    assert steps, "the checkpoint lines carry no step_N directory"


def test_pytorchjob_crd_has_the_scale_subresource_the_script_uses() -> None:
    """`kubectl scale pytorchjob/...` (smoke test and README) needs the CRD's scale subresource
    on the Worker replicas."""
    (crd,) = load_docs(CRD_DIR / "kubeflow.org_pytorchjobs.yaml")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    scale = version["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.pytorchReplicaSpecs.Worker.replicas"
    assert re.search(r"\bscale pytorchjob\b", SMOKE.read_text())


# ---- smoke-test.sh against a stand-in cluster ----

# kubectl and helm stand-ins: a cluster whose job runs at once, logs a checkpoint, resumes when
# worker-0's pod is deleted and succeeds when scaled to one worker (FAKE_FAIL=1: it fails at
# once). Every call is appended to calls.log; helm keeps the values file it was given.
FAKE_CLUSTER = """#!{python}
import json, os, shutil, sys
from pathlib import Path

state_dir = Path(os.environ["FAKE_STATE"])
state_file = state_dir / "state.json"
state = json.loads(state_file.read_text()) if state_file.exists() else {{}}
args = sys.argv[1:]
with open(state_dir / "calls.log", "a") as calls:
    calls.write(" ".join([Path(sys.argv[0]).name, *args]) + "\\n")
if args[:1] == ["--namespace"]:
    args = args[2:]
job = state.get("job", "")
out = ""
code = 0

def conditions():
    if os.environ.get("FAKE_FAIL"):
        return {{"Created": "True", "Failed": "True"}}
    done = state.get("scaled", False)
    return {{"Created": "True", "Running": "False" if done else "True",
             "Succeeded": "True" if done else "False"}}

if Path(sys.argv[0]).name == "helm":
    if args[0] == "install":
        shutil.copy(args[args.index("--values") + 1], state_dir / "values.yaml")
        state["job"] = args[1] + "-rsdino-pretrain"
elif args[:2] == ["config", "current-context"]:
    out = "fake"
elif args[:2] == ["get", "crd"]:
    code = 0 if args[2] == "pytorchjobs.kubeflow.org" else 1
elif args[:2] == ["get", "pytorchjobs"]:
    out = job
elif args[:2] == ["get", "pytorchjob"] and "jsonpath={{range" in " ".join(args):
    out = " ".join(f"{{k}}={{v}}" for k, v in conditions().items())
elif args[:2] == ["get", "pytorchjob"]:
    wanted = args[-1].split('"')[1]
    out = conditions().get(wanted, "")
elif args[:2] == ["get", "pod"]:
    pod, field = args[2], args[-1]
    gone = pod.endswith("-1") and state.get("scaled")
    if not gone:
        uid = f"uid-{{state.get('deletions', 0)}}"
        out = {{"jsonpath={{.metadata.uid}}": uid, "jsonpath={{.status.phase}}": "Running",
               "jsonpath={{.metadata.name}}": pod}}.get(field, "")
    code = 1 if gone else 0
elif args[:2] == ["delete", "pod"]:
    state["deletions"] = state.get("deletions", 0) + 1
elif args[:2] == ["scale", "pytorchjob"]:
    state["scaled"] = True
elif args[0] == "logs":
    lines = [f"[pod/{{job}}-worker-0/pytorch] 10:00:00 INFO checkpoint /checkpoints/r/step_00000025"
             " complete (0.10s after the save began)"]
    if state.get("deletions"):
        lines.append(f"[pod/{{job}}-worker-1/pytorch] 10:01:00 INFO resumed from"
                     " /checkpoints/r/step_00000050 (step 50, saved by 2 ranks, now 2) in 0.5s")
    out = "\\n".join(lines)
state_file.write_text(json.dumps(state))
if out:
    print(out)
sys.exit(code)
"""


def run_smoke_on_fake_cluster(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("kubectl", "helm"):
        fake = bin_dir / tool
        fake.write_text(FAKE_CLUSTER.format(python=sys.executable))
        fake.chmod(0o755)
    environment = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_STATE": str(tmp_path),
        **env,
    }
    return subprocess.run(
        ["bash", str(SMOKE), "--pvc", "rwx", "--release", "smoke-x", "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


def test_smoke_script_passes_on_a_cluster_that_behaves(tmp_path: Path) -> None:
    result = run_smoke_on_fake_cluster(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from:      step 50 after deleting smoke-x-rsdino-pretrain-worker-0" in (
        result.stdout
    )
    assert "smoke test passed" in result.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    order = [
        "helm install smoke-x",
        "kubectl --namespace ml delete pod smoke-x-rsdino-pretrain-worker-0",
        "kubectl --namespace ml scale pytorchjob smoke-x-rsdino-pretrain --replicas=1",
        "helm uninstall smoke-x",
    ]
    positions = [next(i for i, c in enumerate(calls) if c.startswith(o)) for o in order]
    assert positions == sorted(positions), calls
    # What the script handed to helm is a values file the chart renders.
    values = yaml.safe_load((tmp_path / "values.yaml").read_text())
    assert values["checkpoint"] == {"persistentVolumeClaim": "rwx"}
    find_one(render_chart(values, release="smoke-x"), "PyTorchJob")


def test_smoke_script_fails_and_cleans_up_when_the_job_fails(tmp_path: Path) -> None:
    result = run_smoke_on_fake_cluster(tmp_path, FAKE_FAIL="1")
    assert result.returncode == 1
    assert "FAILED: the job failed while waiting for pytorchjob/smoke-x-rsdino-pretrain" in (
        result.stderr
    )
    calls = (tmp_path / "calls.log").read_text()
    assert "describe pytorchjob smoke-x-rsdino-pretrain" in calls  # diagnostics
    assert "helm uninstall smoke-x" in calls
    assert "delete pod" not in calls
