"""An emulation of the Kubeflow training operator (v1 PyTorchJob, release 1.9) and the kubelet.

It reads a rendered PyTorchJob and its ConfigMaps/Secrets and runs every Worker replica as a
"pod": a real process tree with the container's real command (``rsdino-torchrun`` from this
machine's installed package), killed and restarted as the operator and kubelet would.

What a pod is here, and why:

- One network namespace per job stands in for the cluster network: each pod gets its own
  loopback address (127.0.0.10 + index) as its pod IP, so the fixed ports (the c10d store on
  23456, the metrics port) never clash between pods, with the host, or with another test run.
- Each container run is started by a small "shim" (this file run with ``--pod-shim``, the role
  containerd-shim plays): it unshares PID, mount and UTS namespaces and forks the container's
  PID 1, then waits for it and exits with its status (128 + N when it died of signal N), which
  is what the kubelet reports. PID 1 is the container command itself (exec), so SIGTERM sent to
  it reaches only torchrun, as on Kubernetes; SIGKILL of PID 1 ends the whole PID namespace.
- Before the exec, PID 1 sets the hostname to the pod name, builds a private root filesystem
  (a copy-on-write overlay of the host's /, with a tmpfs upper layer that vanishes with the
  container), mounts the pod's volumes at their real mountPaths, writes /etc/hosts that maps
  every ``<job>-worker-<i>`` to that pod's IP (so only worker-0 thinks it hosts the c10d store),
  makes the root read-only when ``readOnlyRootFilesystem`` says so, chroots, drops to the
  securityContext's user and groups, and execs the command with the container env.

Deviations from a real operator and kubelet (each one chosen because the test cannot do better
on one machine, none of them changes what the trainer sees through its own interfaces):

- No API server, admission, scheduler or reconcile queue: a thread polls the pods every 0.1 s and
  acts at once. Only the Worker replica type exists (the chart renders no Master).
- Pod IPs are stable per replica index (a recreated pod keeps its address), and every name up to
  max(replicas, elastic.maxReplicas) resolves from the start through /etc/hosts: there is no DNS
  server and no Service objects, so reverse lookups fail (c10d logs "The hostname of the client
  socket cannot be retrieved", harmless). No KUBERNETES_SERVICE_* variables (headless Services
  get none).
- The image is this machine: the root filesystem is the host's /, PATH starts with this Python's
  bin directory, and the image's ENV is only PATH and the locale. The directories above this
  Python and above the installed rsdino package (/root/.pyenv, a checkout made by mktemp) are
  made traversable in the pod's private root layer, so they run as the non-root user the
  securityContext asks for. Capabilities and allowPrivilegeEscalation are not
  applied beyond what dropping to a non-root uid does. Resources (CPU, memory, GPUs) and emptyDir
  size limits are not enforced; ``medium: Memory`` emptyDirs are host directories, not tmpfs.
- emptyDirs are host directories under the test's tmp dir, new for every pod incarnation and kept
  after the pod is gone (the kubelet deletes them) so a test can read what a pod wrote. Claims
  (``persistentVolumeClaim``) are host directories the test provides, shared by all pods like a
  ReadWriteMany volume; the kubelet's fsGroup ownership change is done as chgrp + setgid + g+rwx.
- Container restarts in place (OnFailure, Always) back off from ``backoff_seconds`` doubling to
  ``max_backoff_seconds`` (the kubelet's 10 s .. 300 s is too slow for tests).
- ``runPolicy.backoffLimit`` counts every in-place restart and every recreation of the job's pods;
  the job is Failed when one more would exceed it. Upstream sums the restart counts of running
  pods and the reconcile requeues, which kubeflow/trainer#2044/#2045 show to be unreliable.
- Once the job is Succeeded or Failed nothing is restarted or recreated any more; then
  ``cleanPodPolicy`` Running/All deletes the pods still running (None leaves them).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POD_IP_BASE = 10  # worker i has pod IP 127.0.0.(POD_IP_BASE + i)
RDZV_PORT_NAME = "pytorchjob-port"
DEFAULT_RDZV_PORT = 23456
FINISHED = ("Succeeded", "Failed")


class NotSupported(ValueError):
    """The rendered object uses a Kubernetes feature this emulation does not implement."""


def pod_ip(index: int) -> str:
    return f"127.0.0.{POD_IP_BASE + index}"


# --- what the kubelet does to strings: $(VAR) expansion ---------------------------------------

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubelet expansion: ``$(VAR)`` becomes VAR's value when defined (else stays as written),
    ``$$`` becomes ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, text)


# --- what the operator injects ----------------------------------------------------------------


def rdzv_port(container: dict[str, Any]) -> int:
    for port in container.get("ports", []):
        if port.get("name") == RDZV_PORT_NAME:
            return int(port["containerPort"])
    return DEFAULT_RDZV_PORT  # the operator's defaulting adds this port


def operator_env(job: dict[str, Any], container: dict[str, Any]) -> list[dict[str, str]]:
    """The variables the training operator appends to every container of an elastic job."""
    spec = job["spec"]
    name = job["metadata"]["name"]
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "PET_NPROC_PER_NODE", "value": str(spec.get("nprocPerNode", "auto"))},
    ]
    elastic = spec.get("elasticPolicy")
    if elastic is None:
        raise NotSupported("only elastic PyTorchJobs (spec.elasticPolicy) are emulated")
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    replicas = int(worker.get("replicas", 1))
    low = elastic.get("minReplicas", replicas)
    high = elastic.get("maxReplicas", replicas)
    env.append({"name": "PET_RDZV_ENDPOINT", "value": f"{name}-worker-0:{rdzv_port(container)}"})
    if "rdzvBackend" in elastic:
        env.append({"name": "PET_RDZV_BACKEND", "value": str(elastic["rdzvBackend"])})
    env.append({"name": "PET_NNODES", "value": f"{low}:{high}"})
    if elastic.get("maxRestarts") is not None:
        env.append({"name": "PET_MAX_RESTARTS", "value": str(elastic["maxRestarts"])})
    if elastic.get("rdzvId"):
        env.append({"name": "PET_RDZV_ID", "value": str(elastic["rdzvId"])})
    if elastic.get("rdzvConf"):
        pairs = ",".join(f"{item['key']}={item['value']}" for item in elastic["rdzvConf"])
        env.append({"name": "PET_RDZV_CONF", "value": pairs})
    return env


# --- the objects a pod refers to --------------------------------------------------------------


@dataclass
class ClusterObjects:
    """The rendered objects the emulation needs, looked up by kind and name."""

    job: dict[str, Any]
    config_maps: dict[str, dict[str, str]]
    secrets: dict[str, dict[str, str]]
    others: list[dict[str, Any]]

    @classmethod
    def from_rendered(
        cls, objects: Iterable[dict[str, Any]], secrets: dict[str, dict[str, str]] | None = None
    ) -> ClusterObjects:
        objects = list(objects)
        jobs = [o for o in objects if o.get("kind") == "PyTorchJob"]
        if len(jobs) != 1:
            raise ValueError(f"expected one PyTorchJob among the objects, found {len(jobs)}")
        config_maps = {
            o["metadata"]["name"]: dict(o.get("data") or {})
            for o in objects
            if o.get("kind") == "ConfigMap"
        }
        others = [o for o in objects if o.get("kind") not in {"PyTorchJob", "ConfigMap"}]
        return cls(jobs[0], config_maps, dict(secrets or {}), others)

    def find(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.others if o.get("kind") == kind]


def _field_ref(path: str, pod: dict[str, Any]) -> str:
    label = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if label:
        return str(pod["metadata"].get(label.group(1), {}).get(label.group(2), ""))
    values = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "status.podIP": pod["status"]["podIP"],
        "status.podIPs": pod["status"]["podIP"],
        "status.hostIP": "127.0.0.1",
        "spec.nodeName": socket.gethostname(),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
    }
    if path not in values:
        raise NotSupported(f"fieldRef {path!r} is not emulated")
    return str(values[path])


def _key_ref(ref: dict[str, Any], source: dict[str, dict[str, str]], kind: str) -> str | None:
    data = source.get(ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise LookupError(f"{kind} {ref['name']!r} key {ref.get('key')!r} does not exist")
    return data[ref["key"]]


def container_env(
    container: dict[str, Any], pod: dict[str, Any], objects: ClusterObjects
) -> dict[str, str]:
    """The env the kubelet gives the container: the image's ENV, then envFrom, then env (in
    order, each value expanded with the variables before it)."""
    python_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{python_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    for name in ("LANG", "LC_ALL"):
        if name in os.environ:
            env[name] = os.environ[name]
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            ref, data = source["secretRef"], objects.secrets
        elif "configMapRef" in source:
            ref, data = source["configMapRef"], objects.config_maps
        else:
            raise NotSupported(f"envFrom {source} is not emulated")
        if ref["name"] not in data:
            if ref.get("optional"):
                continue
            raise LookupError(f"envFrom refers to {ref['name']!r}, which does not exist")
        env.update({prefix + key: value for key, value in data[ref["name"]].items()})
    for item in container.get("env", []):
        if "value" in item or "valueFrom" not in item:
            env[item["name"]] = expand(str(item.get("value", "")), env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            value: str | None = _field_ref(source["fieldRef"]["fieldPath"], pod)
        elif "secretKeyRef" in source:
            value = _key_ref(source["secretKeyRef"], objects.secrets, "Secret")
        elif "configMapKeyRef" in source:
            value = _key_ref(source["configMapKeyRef"], objects.config_maps, "ConfigMap")
        else:
            raise NotSupported(f"env {item['name']}: valueFrom {source} is not emulated")
        if value is not None:
            env[item["name"]] = value
    return env


# --- pods ---------------------------------------------------------------------------------------


@dataclass
class ContainerRun:
    """One start of the container: its shim process, log and the exit code once it ended."""

    number: int  # 0 for the first start of this pod incarnation
    process: subprocess.Popen
    log_path: Path
    pid_file: Path
    exit_code: int | None = None

    def container_pid(self, timeout: float = 10.0) -> int:
        """Host PID of the container's PID 1 (the shim writes it right after the fork)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.pid_file.read_text() if self.pid_file.exists() else ""
            if text.strip():
                return int(text)
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not start; see {self.log_path}")
            time.sleep(0.01)


@dataclass
class Pod:
    """A Worker pod: one incarnation (a recreated pod is a new Pod with fresh emptyDirs)."""

    index: int
    name: str
    incarnation: int
    directory: Path
    runs: list[ContainerRun] = field(default_factory=list)
    restart_at: float | None = None  # the kubelet's back-off: when to start the next run
    deleting_since: float | None = None
    grace_seconds: float = 30.0
    recreate: bool = True  # after a deletion: whether the operator makes a new pod

    @property
    def ip(self) -> str:
        return pod_ip(self.index)

    @property
    def current(self) -> ContainerRun | None:
        return self.runs[-1] if self.runs else None

    def running(self) -> bool:
        run = self.current
        return run is not None and run.exit_code is None

    def volume_dir(self, volume: str) -> Path:
        return self.directory / "volumes" / volume


class ClusterNetwork:
    """A network namespace with loopback up: the pods' network, private to one job."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep 1d"],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != b"up":
            self.holder.kill()
            raise RuntimeError("could not create the cluster network namespace")
        self.path = f"/proc/{self.holder.pid}/ns/net"

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the cluster network."""
        return ["nsenter", f"--net={self.path}", *argv]

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()


class PyTorchJobEmulator:
    """The operator and kubelet for one PyTorchJob; start() runs it, close() ends every pod."""

    def __init__(
        self,
        objects: ClusterObjects,
        workdir: Path,
        claims: dict[str, Path],
        *,
        namespace: str = "default",
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self.objects = objects
        self.job = objects.job
        self.name: str = self.job["metadata"]["name"]
        self.namespace = namespace
        self.workdir = workdir
        self.claims = claims
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        spec = self.job["spec"]
        self.worker: dict[str, Any] = spec["pytorchReplicaSpecs"]["Worker"]
        extra = set(spec["pytorchReplicaSpecs"]) - {"Worker"}
        if extra:
            raise NotSupported(f"replica types {sorted(extra)}: only Worker is emulated")
        self.replicas = int(self.worker.get("replicas", 1))
        self.restart_policy: str = self.worker.get("restartPolicy", "OnFailure")
        if self.restart_policy not in {"OnFailure", "Always", "ExitCode", "Never"}:
            raise NotSupported(f"restartPolicy {self.restart_policy!r}")
        run_policy = spec.get("runPolicy", {})
        self.backoff_limit: int | None = run_policy.get("backoffLimit")
        self.clean_pod_policy: str = run_policy.get("cleanPodPolicy", "None")
        elastic = spec.get("elasticPolicy", {})
        self.max_names = max(self.replicas, int(elastic.get("maxReplicas", self.replicas)))
        self.conditions: list[dict[str, str]] = []
        self.exits: list[tuple[str, int, int]] = []  # (pod name, incarnation, exit code)
        self.restarts = 0  # in-place restarts + recreations, as backoffLimit counts them
        self.pods: dict[int, Pod] = {}
        self.all_pods: list[Pod] = []
        self._incarnations: dict[int, int] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.network: ClusterNetwork | None = None
        self._helpers: list[subprocess.Popen] = []

    # -- public API ----------------------------------------------------------------------------

    def start(self) -> PyTorchJobEmulator:
        self.network = ClusterNetwork()
        self._condition("Created", "PyTorchJobCreated", f"PyTorchJob {self.name} is created.")
        self._thread = threading.Thread(target=self._loop, name="operator", daemon=True)
        self._thread.start()
        return self

    @property
    def phase(self) -> str:
        """The newest condition type (what ``kubectl get pytorchjobs`` shows as STATE)."""
        with self._lock:
            return self.conditions[-1]["type"] if self.conditions else ""

    def condition_types(self) -> list[str]:
        with self._lock:
            return [c["type"] for c in self.conditions]

    def scale(self, replicas: int) -> None:
        """Patch spec.pytorchReplicaSpecs.Worker.replicas (what an HPA or kubectl scale does)."""
        with self._lock:
            self.replicas = replicas
            self.max_names = max(self.max_names, replicas)

    def pod(self, index: int) -> Pod:
        with self._lock:
            return self.pods[index]

    def kill_pod(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Signal the container's PID 1 (SIGKILL ends every process in the pod)."""
        with self._lock:
            run = self.pods[index].current
            assert run is not None and run.exit_code is None, f"pod {index} is not running"
            os.kill(run.container_pid(), sig)

    def delete_pod(self, index: int) -> None:
        """``kubectl delete pod``: SIGTERM to PID 1, SIGKILL after the grace period; then the
        operator creates the pod again (unless the job was scaled below it)."""
        with self._lock:
            self._begin_deletion(self.pods[index], recreate=True)

    def run_in_network(self, argv: list[str], log_path: Path) -> subprocess.Popen:
        """Start a helper (e.g. Prometheus) in the cluster network; close() ends it."""
        assert self.network is not None
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self.network.command(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._helpers.append(process)
        return process

    def fetch(self, url: str, timeout: float = 10.0) -> bytes:
        """HTTP GET from inside the cluster network."""
        assert self.network is not None
        done = subprocess.run(
            self.network.command(["curl", "-sf", "--max-time", str(timeout), url]),
            capture_output=True,
            timeout=timeout + 5,
        )
        if done.returncode != 0:
            raise OSError(f"GET {url} failed (curl exit {done.returncode})")
        return done.stdout

    def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        while_running: bool = True,
    ) -> None:
        """Poll ``predicate`` until true; fail with the job's state and pod logs on timeout or,
        with ``while_running``, as soon as the job finished without it coming true."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if while_running and self.phase in FINISHED and not predicate():
                raise AssertionError(f"the job is {self.phase} before {what}\n" + self.report())
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}\n" + self.report()
                )
            time.sleep(0.1)

    def wait_finished(self, timeout: float) -> str:
        self.wait_until(
            lambda: self.phase in FINISHED, timeout, "the job to finish", while_running=False
        )
        return self.phase

    def volume_dirs(self, volume: str) -> list[Path]:
        """The volume's host directory in every pod incarnation so far, oldest first."""
        with self._lock:
            return [pod.volume_dir(volume) for pod in self.all_pods]

    def logs(self, tail: int = 4000) -> str:
        """Every container run's log (like ``kubectl logs`` and ``--previous``), each cut to its
        last ``tail`` characters."""
        with self._lock:
            runs = [(pod, run) for pod in self.all_pods for run in pod.runs]
        parts = []
        for pod, run in runs:
            text = run.log_path.read_text(errors="replace") if run.log_path.exists() else ""
            header = (
                f"===== {pod.name} (incarnation {pod.incarnation}, run {run.number}, "
                f"exit {run.exit_code}) ====="
            )
            parts.append(f"{header}\n{text[-tail:]}")
        return "\n".join(parts)

    def full_logs(self) -> str:
        return self.logs(tail=10**9)

    def report(self) -> str:
        with self._lock:
            state = (
                f"conditions: {self.condition_types()}; exits: {self.exits}; "
                f"restarts: {self.restarts}"
            )
        return f"{state}\n{self.logs()}"

    def close(self) -> None:
        """End the operator and every process it started, whatever state they are in."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for pod in self.all_pods:
                for run in pod.runs:
                    _kill_run(run)
            for helper in self._helpers:
                if helper.poll() is None:
                    os.killpg(helper.pid, signal.SIGKILL)
                helper.wait()
            if self.network is not None:
                self.network.close()

    def __enter__(self) -> PyTorchJobEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the operator and kubelet loop ---------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                try:
                    self._reconcile()
                except Exception as exc:  # surfaced as a Failed condition, never swallowed
                    self._condition("Failed", "EmulationError", repr(exc))
                    raise
            time.sleep(0.1)

    def _reconcile(self) -> None:
        now = time.monotonic()
        for pod in list(self.pods.values()):
            self._observe(pod, now)
        if self.phase in FINISHED:
            return
        for index in range(self.replicas):
            if index not in self.pods:
                self._create_pod(index)
        for index, pod in self.pods.items():
            if index >= self.replicas and pod.deleting_since is None:
                self._begin_deletion(pod, recreate=False)
        active = [p for i, p in self.pods.items() if i < self.replicas and p.running()]
        if len(active) == self.replicas and self.phase != "Running":
            self._condition("Running", "PyTorchJobRunning", f"PyTorchJob {self.name} is running.")

    def _observe(self, pod: Pod, now: float) -> None:
        run = pod.current
        if run is not None and run.exit_code is None:
            code = run.process.poll()
            if code is None:
                if pod.deleting_since is not None and now - pod.deleting_since > pod.grace_seconds:
                    _kill_run(run)  # the kubelet's SIGKILL after the grace period
                return
            run.exit_code = 128 - code if code < 0 else code
            self.exits.append((pod.name, pod.incarnation, run.exit_code))
            if pod.deleting_since is None:
                self._on_exit(pod, run.exit_code)
        if pod.deleting_since is not None and not pod.running():
            del self.pods[pod.index]  # gone; _reconcile recreates it if still wanted
        elif pod.restart_at is not None and now >= pod.restart_at and self.phase not in FINISHED:
            pod.restart_at = None
            self._start_container(pod)

    def _on_exit(self, pod: Pod, code: int) -> None:
        if self.phase in FINISHED:
            return
        if code == 0:  # elastic: the job is done as soon as any worker is
            self._condition("Succeeded", "PyTorchJobSucceeded", f"{pod.name} exited 0.")
            self._clean_pods()
            return
        policy = self.restart_policy
        if policy == "Never" or (policy == "ExitCode" and 1 <= code <= 127):
            self._condition("Failed", "PyTorchJobFailed", f"{pod.name} exited {code} ({policy}).")
            self._clean_pods()
            return
        if self.backoff_limit is not None and self.restarts + 1 > self.backoff_limit:
            self._condition("Failed", "BackoffLimitExceeded", f"{pod.name} exited {code}.")
            self._clean_pods()
            return
        self.restarts += 1
        self._condition("Restarting", "PyTorchJobRestarting", f"{pod.name} exited {code}.")
        if policy == "ExitCode":  # the operator deletes the pod and creates a new one
            del self.pods[pod.index]
            self._create_pod(pod.index)
        else:  # the kubelet restarts the container in the same pod after a back-off
            delay = self.backoff_seconds * 2 ** (len(pod.runs) - 1)
            pod.restart_at = time.monotonic() + min(delay, self.max_backoff_seconds)

    def _clean_pods(self) -> None:
        if self.clean_pod_policy in {"Running", "All"}:
            for pod in self.pods.values():
                if pod.running() and pod.deleting_since is None:
                    self._begin_deletion(pod, recreate=False)

    def _begin_deletion(self, pod: Pod, *, recreate: bool) -> None:
        pod.deleting_since = time.monotonic()
        pod.recreate = recreate
        pod.restart_at = None
        spec = self.worker["template"]["spec"]
        pod.grace_seconds = float(spec.get("terminationGracePeriodSeconds", 30))
        run = pod.current
        if run is not None and run.exit_code is None:
            os.kill(run.container_pid(), signal.SIGTERM)

    def _condition(self, kind: str, reason: str, message: str) -> None:
        self.conditions.append({"type": kind, "reason": reason, "message": message})

    # -- making pods -------------------------------------------------------------------------

    def _create_pod(self, index: int) -> None:
        incarnation = self._incarnations.get(index, -1) + 1
        self._incarnations[index] = incarnation
        name = f"{self.name}-worker-{index}"
        pod = Pod(index, name, incarnation, self.workdir / "pods" / f"{name}.{incarnation}")
        self.pods[index] = pod
        self.all_pods.append(pod)
        self._prepare_volumes(pod)
        self._start_container(pod)

    def _pod_object(self, pod: Pod) -> dict[str, Any]:
        """The Pod as the API would hold it, for fieldRef lookups."""
        template = self.worker["template"]
        metadata = template.get("metadata", {})
        labels = {
            **metadata.get("labels", {}),
            "training.kubeflow.org/job-name": self.name,
            "training.kubeflow.org/replica-type": "worker",
            "training.kubeflow.org/replica-index": str(pod.index),
        }
        return {
            "metadata": {
                "name": pod.name,
                "namespace": self.namespace,
                "uid": f"{pod.name}-{pod.incarnation}",
                "labels": labels,
                "annotations": metadata.get("annotations", {}),
            },
            "spec": template["spec"],
            "status": {"podIP": pod.ip},
        }

    def _prepare_volumes(self, pod: Pod) -> None:
        spec = self.worker["template"]["spec"]
        security = spec.get("securityContext", {})
        fs_group = security.get("fsGroup")
        for volume in spec.get("volumes", []):
            target = pod.volume_dir(volume["name"])
            if "emptyDir" in volume:
                target.mkdir(parents=True)
                target.chmod(0o777)  # the kubelet creates emptyDirs world-writable
            elif "configMap" in volume:
                source = volume["configMap"]
                data = self.objects.config_maps.get(source["name"])
                if data is None:
                    raise LookupError(f"ConfigMap {source['name']!r} is not among the objects")
                _write_keys(target, data, source.get("items"), source.get("defaultMode", 0o644))
            elif "secret" in volume:
                source = volume["secret"]
                data = self.objects.secrets.get(source["secretName"])
                if data is None:
                    raise LookupError(f"Secret {source['secretName']!r} was not given")
                _write_keys(target, data, source.get("items"), source.get("defaultMode", 0o644))
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if claim not in self.claims:
                    raise LookupError(f"claim {claim!r} has no host directory in this test")
                host = self.claims[claim]
                host.mkdir(parents=True, exist_ok=True)
                if fs_group is not None:  # the kubelet's volume ownership change
                    os.chown(host, -1, int(fs_group))
                    host.chmod(0o2775)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(host)
            else:
                raise NotSupported(
                    f"volume {volume['name']!r}: only emptyDir, configMap, secret "
                    "and persistentVolumeClaim are emulated"
                )

    def _mounts(self, pod: Pod, container: dict[str, Any]) -> list[dict[str, Any]]:
        spec = self.worker["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = []
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            source = pod.volume_dir(mount["name"]).resolve()
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            read_only = bool(mount.get("readOnly")) or any(
                volume.get(kind, {}).get("readOnly", False) for kind in ("persistentVolumeClaim",)
            )
            read_only = read_only or "configMap" in volume or "secret" in volume
            mounts.append(
                {"source": str(source), "target": mount["mountPath"], "read_only": read_only}
            )
        return mounts

    def _start_container(self, pod: Pod) -> None:
        spec = self.worker["template"]["spec"]
        containers = spec["containers"]
        if len(containers) != 1 or spec.get("initContainers"):
            raise NotSupported("only a single container and no initContainers are emulated")
        container = containers[0]
        if container.get("name") != "pytorch":
            raise ValueError("the training operator needs the container to be named 'pytorch'")
        if "command" not in container:
            raise NotSupported("the emulation has no image ENTRYPOINT: the container needs command")
        env_spec = {
            **container,
            "env": [*container.get("env", []), *operator_env(self.job, container)],
        }
        env = container_env(env_spec, self._pod_object(pod), self.objects)
        argv = [expand(part, env) for part in [*container["command"], *container.get("args", [])]]
        pod_security = spec.get("securityContext", {})
        security = {**pod_security, **container.get("securityContext", {})}
        uid = int(security.get("runAsUser", 0))
        if security.get("runAsNonRoot") and uid == 0:
            raise ValueError(f"{pod.name}: runAsNonRoot with user 0 (CreateContainerConfigError)")
        groups = [int(g) for g in pod_security.get("supplementalGroups", [])]
        if pod_security.get("fsGroup") is not None:
            groups.append(int(pod_security["fsGroup"]))
        number = len(pod.runs)
        run_dir = pod.directory / f"run-{number}"
        (run_dir / "root").mkdir(parents=True)
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost"]
        for index in range(self.max_names):
            name = f"{self.name}-worker-{index}"
            hosts.append(f"{pod_ip(index)}\t{name} {name}.{self.namespace}.svc.cluster.local")
        init = {
            "hostname": pod.name,
            "hosts": "\n".join(hosts) + "\n",
            "root": str(run_dir / "root"),
            "mounts": self._mounts(pod, container),
            "read_only_root": bool(security.get("readOnlyRootFilesystem", False)),
            "traversable": _image_directories(),
            "uid": uid,
            "gid": int(security.get("runAsGroup", 0)),
            "groups": groups,
            "working_dir": container.get("workingDir", "/"),
            "argv": argv,
            "env": env,
            "pid_file": str(run_dir / "container.pid"),
        }
        spec_path = run_dir / "init.json"
        spec_path.write_text(json.dumps(init, indent=1))
        log_path = self.workdir / "logs" / f"{pod.name}.{pod.incarnation}.{number}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        assert self.network is not None
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                self.network.command([sys.executable, __file__, "--pod-shim", str(spec_path)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        pod.runs.append(ContainerRun(number, process, log_path, Path(init["pid_file"])))


def _write_keys(
    target: Path, data: dict[str, str], items: list[dict[str, Any]] | None, mode: int
) -> None:
    target.mkdir(parents=True)
    chosen = [(item["key"], item["path"]) for item in items] if items else [(k, k) for k in data]
    for key, path in chosen:
        file = target / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(data[key])
        file.chmod(mode)


def _kill_run(run: ContainerRun) -> None:
    """SIGKILL the container's PID 1 (its PID namespace dies with it), then the shim."""
    if run.process.poll() is None:
        text = run.pid_file.read_text().strip() if run.pid_file.exists() else ""
        if text:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(text), signal.SIGKILL)
        try:
            run.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.process.wait()


# --- inside the pod: the shim and the container's PID 1 (standard library only) --------------

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWPID = 0x20000000
_PR_SET_PDEATHSIG = 1


def _libc_call(name: str, *args: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _pod_shim(spec_path: str) -> int:
    """Unshare PID/mount/UTS namespaces, fork PID 1, report its exit like the kubelet does."""
    spec = json.loads(Path(spec_path).read_text())
    _libc_call("unshare", _CLONE_NEWNS | _CLONE_NEWUTS | _CLONE_NEWPID)
    child = os.fork()
    if child == 0:
        try:
            _container_init(spec)
        except BaseException as exc:  # the container could not start: tell the log, exit 128
            print(f"pod-init: {exc!r}", file=sys.stderr, flush=True)
            os._exit(128)
    Path(spec["pid_file"]).write_text(str(child))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # signals are for PID 1, not for the shim
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _image_directories() -> list[str]:
    """Every directory above this Python and the rsdino package: what the "image" must let a
    non-root user pass through."""
    import rsdino

    places = (Path(sys.executable).resolve(), Path(rsdino.__file__).resolve())
    return sorted({str(parent) for place in places for parent in place.parents})


def _container_init(spec: dict[str, Any]) -> None:
    """PID 1 of the pod: hostname, root filesystem, volumes, /etc/hosts, user; then exec."""
    _mount("--make-rprivate", "/")
    socket.sethostname(spec["hostname"])
    root = Path(spec["root"])
    _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(root))
    upper, work, merged = root / "upper", root / "work", root / "merged"
    for directory in (upper, work, merged):
        directory.mkdir()
    _mount(
        "-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}", str(merged)
    )
    _mount("-t", "proc", "proc", str(merged / "proc"))
    for system in ("dev", "sys"):
        _mount("--rbind", f"/{system}", str(merged / system))
    for directory in spec["traversable"]:  # copied up into the pod's layer, the host's unchanged
        inside = merged / directory.lstrip("/")
        inside.chmod(inside.stat().st_mode | 0o111)
    (merged / "etc" / "hosts").write_text(spec["hosts"])
    (merged / "etc" / "hostname").write_text(spec["hostname"] + "\n")
    for mount in spec["mounts"]:
        target = merged / mount["target"].lstrip("/")
        if Path(mount["source"]).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        _mount("--bind", mount["source"], str(target))
        if mount["read_only"]:
            _mount("-o", "remount,bind,ro", str(target))
    if spec["read_only_root"]:
        _mount("-o", "remount,bind,ro", str(merged))
    os.chroot(merged)
    os.chdir(spec["working_dir"])
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    _libc_call("prctl", _PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)  # if the shim dies
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--pod-shim":
        return _pod_shim(argv[1])
    print("usage: operator_emulation.py --pod-shim SPEC.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
