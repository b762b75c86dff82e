"""The rendered chart's PyTorchJob, run by the operator emulation: pods die, are deleted, scaled.

Every scenario renders helm/rsdino-pretrain with CPU values, runs what it renders (real
``rsdino-torchrun``, c10d rendezvous on worker-0's pod, gloo) and checks what a user of
``kubectl get pytorchjobs`` and the checkpoint claim would see: the job's conditions, that the
run resumes from the newest complete checkpoint, that the final step is reached and that every
complete checkpoint that ever appeared still loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_OVERRIDES, saved_info, saved_tensors
from helm_chart import render_chart
from operator_emulation import ClusterObjects, PyTorchJobEmulator, pod_ip

from rsdino.train.checkpoint import MARKER

# Pods are PID, mount, UTS and network namespaces: creating them needs root, which CI has.
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the operator emulation creates namespaces, which needs root"
)

RELEASE = "rs"
NAMESPACE = "ml"
CLAIM = "rsdino-checkpoints"
JOB = f"{RELEASE}-rsdino-pretrain"
EPOCH_STEPS = 3  # train.OFFICIAL_EPOCH_LENGTH of the tiny config
BATCH = 4  # train.batch_size_per_gpu of the tiny config
RUN_TIMEOUT = 150  # seconds any one job may take on 2 busy cores


def tiny_overrides(epochs: int, every_steps: int) -> dict[str, Any]:
    """conftest's tiny dotted overrides as the nested mapping training.overrides takes; the
    metrics keys are the chart's (metrics.*), and no checkpoint is ever pruned (keep=1000) so
    the test can reload every checkpoint that appeared."""
    nested: dict[str, Any] = {}
    dotted = [*TINY_OVERRIDES, f"optim.epochs={epochs}", f"checkpoint.every_steps={every_steps}"]
    for item in [*dotted, "checkpoint.keep=1000"]:
        key, _, text = item.partition("=")
        if key.startswith("metrics."):
            continue
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
    return nested


def job_values(
    *,
    steps: int,
    every_steps: int = 3,
    replicas: int = 2,
    restart_policy: str = "OnFailure",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    training = tiny_overrides(steps // EPOCH_STEPS, every_steps)
    for section, keys in (overrides or {}).items():
        training.setdefault(section, {}).update(keys)
    return {
        "worker": {
            "replicas": replicas,
            "nprocPerNode": 1,
            "restartPolicy": restart_policy,
            "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
            "terminationGracePeriodSeconds": 40,
            "shutdownMarginSeconds": 10,
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
        },
        "elastic": {
            "minReplicas": 1,
            "maxReplicas": 2,
            "maxRestarts": 3,
            "joinTimeoutSeconds": 60,
            "lastCallTimeoutSeconds": 2,
        },
        "timeouts": {"collectiveSeconds": 30},
        "runPolicy": {"backoffLimit": 6},
        "checkpoint": {"persistentVolumeClaim": CLAIM},
        "metrics": {"interval": "1s", "podMonitor": {"enabled": True}},
        "training": {"preset": "quickstart", "overrides": training},
    }


class CheckpointWatch:
    """Records every checkpoint of the claim whose commit marker appeared (polls 20x/s)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def complete(self) -> list[int]:
        return sorted(int(p.parent.name[5:]) for p in self.root.glob(f"step_*/{MARKER}"))

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.seen.update(self.complete())

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        self.seen.update(self.complete())
        return sorted(self.seen)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], PyTorchJobEmulator]]:
    """``launch(values)`` renders the chart and starts its job; teardown ends every pod."""
    started: list[PyTorchJobEmulator] = []

    def launch(values: dict[str, Any]) -> PyTorchJobEmulator:
        objects = ClusterObjects.from_rendered(
            render_chart(values, release=RELEASE, namespace=NAMESPACE)
        )
        job = PyTorchJobEmulator(
            objects, tmp_path / "cluster", {CLAIM: tmp_path / "claim"}, namespace=NAMESPACE
        )
        started.append(job)
        return job.start()

    yield launch
    for job in started:
        job.close()


def checkpoint_root(tmp_path: Path) -> Path:
    return tmp_path / "claim" / RELEASE  # the chart sets checkpoint.dir=/checkpoints/<release>


def logged_steps(job: PyTorchJobEmulator) -> list[int]:
    """Steps in train_log.jsonl, from whichever pods' /workspace emptyDirs hold one."""
    steps: list[int] = []
    for workspace in job.volume_dirs("workspace"):
        log = workspace / "run" / "train_log.jsonl"
        if log.exists():
            steps += [json.loads(line)["step"] for line in log.read_text().splitlines()]
    return steps


def resumed_from(job: PyTorchJobEmulator) -> list[int]:
    pattern = rf"resumed from file:///checkpoints/{RELEASE}/step_(\d+)"
    return [int(step) for step in re.findall(pattern, job.full_logs())]


def wait_for_checkpoint(job: PyTorchJobEmulator, watch: CheckpointWatch, step: int) -> None:
    job.wait_until(
        lambda: any(s >= step for s in watch.complete()), RUN_TIMEOUT, f"a checkpoint >= {step}"
    )


def assert_finished_run(
    job: PyTorchJobEmulator, watch: CheckpointWatch, root: Path, steps: int
) -> None:
    """Succeeded, the final step saved, and every checkpoint that appeared still loads."""
    phase = job.wait_finished(RUN_TIMEOUT)
    assert phase == "Succeeded", job.report()
    seen = watch.stop()
    assert seen and seen[-1] == steps, f"checkpoints seen: {seen}\n{job.report()}"
    for step in seen:
        assert saved_info(root, step).step == step
        assert saved_tensors(root, step), f"checkpoint {step} holds no model tensors"


# --- scenarios ------------------------------------------------------------------------------


def prometheus_config(job: PyTorchJobEmulator) -> dict[str, Any]:
    """What the Prometheus Operator makes of the chart's PodMonitor: one scrape job per
    endpoint, each pod's IP with the container port that the endpoint names."""
    ports = {
        port["name"]: port["containerPort"]
        for port in job.worker["template"]["spec"]["containers"][0]["ports"]
    }
    (monitor,) = job.objects.find("PodMonitor")
    scrape_configs = []
    for number, endpoint in enumerate(monitor["spec"]["podMetricsEndpoints"]):
        port = ports[endpoint["port"]]
        targets = [f"{pod_ip(index)}:{port}" for index in range(job.replicas)]
        scrape_configs.append(
            {
                "job_name": f"podMonitor/{NAMESPACE}/{monitor['metadata']['name']}/{number}",
                "scrape_interval": endpoint["interval"],
                "metrics_path": endpoint["path"],
                "honor_labels": endpoint.get("honorLabels", False),
                "static_configs": [{"targets": targets}],
            }
        )
    return {"global": {"scrape_interval": "1s"}, "scrape_configs": scrape_configs}


def query(job: PyTorchJobEmulator, address: str, expression: str) -> list[dict[str, Any]]:
    try:
        body = job.fetch(f"http://{address}/api/v1/query?query={expression}")
    except OSError:
        return []  # Prometheus not up yet
    return json.loads(body)["data"]["result"]


@pytest.mark.slow
def test_two_pods_form_one_world_and_prometheus_scrapes_both(cluster, tmp_path: Path) -> None:
    """(a) Both pods rendezvous into world size 2, train to the end, and the PodMonitor's port
    name leads a real Prometheus to each pod's metrics endpoint."""
    steps = 30
    job = cluster(job_values(steps=steps, every_steps=6))
    root = checkpoint_root(tmp_path)
    watch = CheckpointWatch(root)
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is missing: .ci/run installs it"
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(job)))
    address = "127.0.0.2:9090"  # in the cluster network: no clash with the host's ports
    job.run_in_network(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={address}",
        ],
        tmp_path / "prometheus.log",
    )

    def both_ranks_scraped() -> bool:
        series = query(job, address, "rsdino_world_size")
        return {s["metric"].get("rank") for s in series} == {"0", "1"}

    job.wait_until(both_ranks_scraped, RUN_TIMEOUT, "Prometheus to hold both ranks' series")
    series = query(job, address, "rsdino_world_size")
    pods = {s["metric"]["instance"].split(":")[0] for s in series}
    assert pods == {job.pod(0).ip, job.pod(1).ip}  # each rank from its own pod's endpoint
    assert {s["value"][1] for s in series} == {"2"}

    assert_finished_run(job, watch, root, steps)
    assert saved_info(root, steps).world_size == 2
    assert saved_info(root, steps).samples_seen == steps * 2 * BATCH
    assert logged_steps(job) == list(range(1, steps + 1))
    assert job.restarts == 0 and "Restarting" not in job.condition_types(), job.report()


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker-1", "worker-0-store-host"])
def test_sigkill_of_a_pod_resumes_from_the_newest_checkpoint(
    cluster, tmp_path: Path, victim: int
) -> None:
    """(b) worker-1 or (c) worker-0, the c10d store host, dies with everything in it; the kubelet
    restarts the container in place (OnFailure) and the job resumes from the newest complete
    checkpoint."""
    steps = 36
    job = cluster(job_values(steps=steps))
    root = checkpoint_root(tmp_path)
    watch = CheckpointWatch(root)
    wait_for_checkpoint(job, watch, 6)
    newest_before = watch.complete()[-1]
    job.kill_pod(victim, signal.SIGKILL)

    assert_finished_run(job, watch, root, steps)
    victim_name = f"{JOB}-worker-{victim}"
    assert (victim_name, 0, 137) in job.exits, job.report()
    assert [pod.incarnation for pod in job.all_pods] == [0, 0], "OnFailure keeps the pods"
    resumed = resumed_from(job)
    assert resumed and resumed[0] >= newest_before, job.report()
    assert resumed[0] in watch.seen  # a complete checkpoint, and the run went on from it
    tail = logged_steps(job)[-(steps - resumed[-1]) :]
    assert tail == list(range(resumed[-1] + 1, steps + 1)), job.report()
    assert saved_info(root, steps).world_size == 2


@pytest.mark.slow
def test_pod_deletion_checkpoints_at_the_stop_step_and_resumes_there(
    cluster, tmp_path: Path
) -> None:
    """(d) ``kubectl delete pod``: SIGTERM to PID 1 (torchrun), which forwards it; the ranks agree
    on a step, checkpoint it and exit 143; the recreated pod rejoins and the job resumes from
    exactly that step."""
    steps = 36
    job = cluster(job_values(steps=steps, every_steps=1000, restart_policy="ExitCode"))
    root = checkpoint_root(tmp_path)
    watch = CheckpointWatch(root)
    job.wait_until(lambda: len(logged_steps(job)) >= 3, RUN_TIMEOUT, "training to start")
    job.delete_pod(1)

    assert_finished_run(job, watch, root, steps)
    stopped = re.findall(r"stopped on SIGTERM after step (\d+)", job.full_logs())
    assert stopped, job.report()
    stop_step = int(stopped[0])
    assert watch.seen == {stop_step, steps}  # every_steps=1000: only the stop and the end
    assert saved_info(root, stop_step).samples_seen == stop_step * 2 * BATCH
    assert (f"{JOB}-worker-1", 0, 143) in job.exits, job.report()
    assert resumed_from(job)[0] == stop_step, job.report()
    assert logged_steps(job)[-(steps - stop_step) :] == list(range(stop_step + 1, steps + 1))


@pytest.mark.slow
def test_scale_down_to_one_pod_finishes_on_it(cluster, tmp_path: Path) -> None:
    """(e) 2 -> 1: the removed pod is deleted (SIGTERM, checkpoint), the survivor's torchrun
    forms a world of one and finishes the run."""
    steps = 36
    job = cluster(job_values(steps=steps))
    root = checkpoint_root(tmp_path)
    watch = CheckpointWatch(root)
    wait_for_checkpoint(job, watch, 3)
    job.scale(1)

    assert_finished_run(job, watch, root, steps)
    assert saved_info(root, steps).world_size == 1
    assert saved_info(root, min(watch.seen)).world_size == 2
    assert [pod.index for pod in job.all_pods] == [0, 1], "worker-1 must not come back"
    assert any(code == 143 for name, _, code in job.exits if name.endswith("-1")), job.report()
    assert resumed_from(job), job.report()


@pytest.mark.slow
def test_scale_up_adds_a_pod_to_the_running_world(cluster, tmp_path: Path) -> None:
    """(e) 1 -> 2: torchrun on worker-0 sees a node waiting and stops its workers for a new
    rendezvous round that has both pods; the run goes on in a world of two.

    Plain torchrun (2.13) stalls here: the surviving agent stays rank 0 and never publishes
    MASTER_ADDR under the new round's prefix, so the new pod waits 60 s, both agents exit and
    restart. rsdino-torchrun republishes it each round: no pod may exit during the join."""
    # One pod trains a tiny model at 30-50 steps/s and its workers stop for the join a few
    # seconds after the scale (steps 150-190 on 2 idle cores; 120 steps in all were too
    # few on a fast machine). The steps left then run in the world of two at ~12 steps/s, so the
    # run is only as long as a safe margin for the join needs.
    steps = 600
    job = cluster(job_values(steps=steps, every_steps=60, replicas=1))
    root = checkpoint_root(tmp_path)
    watch = CheckpointWatch(root)
    wait_for_checkpoint(job, watch, 60)
    assert saved_info(root, watch.complete()[0]).world_size == 1
    job.scale(2)

    assert_finished_run(job, watch, root, steps)
    assert [code for _, _, code in job.exits] == [0, 0], job.report()  # no stalled round
    worlds = {step: saved_info(root, step).world_size for step in sorted(watch.seen)}
    assert worlds[steps] == 2 and 1 in worlds.values(), f"{worlds}\n{job.report()}"
    resumed = resumed_from(job)
    assert resumed and resumed[-1] < steps, job.report()  # the world of two trained steps


def test_bad_config_fails_the_job_without_restarts(cluster, tmp_path: Path) -> None:
    """(f) A value the chart's schema lets through but rsdino rejects: every pod exits 2 (a
    permanent code), and under restartPolicy ExitCode the job is Failed, not restarted."""
    values = job_values(
        steps=6, restart_policy="ExitCode", overrides={"student": {"arch": "vit_nonexistent"}}
    )
    job = cluster(values)
    assert job.wait_finished(RUN_TIMEOUT) == "Failed", job.report()
    job.wait_until(lambda: len(job.exits) >= 2, 30, "both pods to exit", while_running=False)
    assert job.restarts == 0 and "Restarting" not in job.condition_types(), job.report()
    assert [pod.incarnation for pod in job.all_pods] == [0, 0]
    assert job.exits and all(code == 2 for _, _, code in job.exits), job.report()
    assert "student.arch='vit_nonexistent' is not one of" in job.full_logs()
    assert not checkpoint_root(tmp_path).exists() or not list(checkpoint_root(tmp_path).iterdir())
