"""fedfleet on a real control plane: helm install, kubectl apply FLJobs, watch them train.

The chart is installed with the real helm into the test cluster; the operator and the bundled
Redis run as real containers (the images deploy/docker/ builds) on the real node; FLJobs are
applied with the real kubectl; a simulated fleet checks in through the selector pods over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from fedfleet.cli import main as cli_main
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.device.http_fleet import HttpFleet
from fedfleet.service.keys import JobKeys
from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.factory import open_store
from fedfleet.store.history.redis_models import models_in_store
from fedfleet.tasks.weights_file import load_weights
from fedfleet.up import UpOptions
from tests.cluster.conftest import Cluster

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fedfleet"


@dataclass
class Installed:
    namespace: str
    redis_url: str


def _secret(cluster: Cluster, ns: str, name: str, key: str) -> str:
    obj = cluster.get("secret", name, ns)
    assert obj is not None, f"secret {ns}/{name} missing"
    return base64.b64decode(obj["data"][key]).decode()


def _ready_pods(cluster: Cluster, ns: str, selector: str) -> list[dict[str, Any]]:
    pods = cluster.list("pods", ns, selector)
    return [
        p
        for p in pods
        if p.get("metadata", {}).get("deletionTimestamp") is None
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions", [])
        )
    ]


def _redis_volume(cluster: Cluster, ns: str) -> str:
    """A hostPath PersistentVolume on the node, bound in advance to the bundled Redis's claim
    (the test cluster has no volume provisioner): its append-only file outlives its pod."""
    path = cluster.node.workdir / "volumes" / ns
    path.mkdir(parents=True)
    os.chown(path, 999, 999)  # the chart's redis.runAsUser (hostPath ignores fsGroup)
    name = f"{ns}-redis"
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {"namespace": ns, "name": "data-fedfleet-redis-0"},
            },
        },
        ns,
    )
    return name


@pytest.fixture(scope="module")
def fedfleet(cluster: Cluster) -> Iterator[Installed]:
    lint = cluster.helm("lint", str(CHART), "--strict", check=True)
    assert "0 chart(s) failed" in lint.stdout
    ns = cluster.create_namespace("fedfleet-system")
    volume = _redis_volume(cluster, ns)
    redis_repo, redis_tag = cluster.image("redis").rsplit(":", 1)
    cluster.helm(
        "install",
        "fedfleet",
        str(CHART),
        "-n",
        ns,
        "--set",
        # The locally built images (no registry here): the operator's is the chart's default
        # name; the bundled Redis is Debian's, from deploy/build-images.sh. Persistence is on
        # (the chart's default), on the volume above.
        f"redis.image.repository={redis_repo},redis.image.tag={redis_tag}",
        "--wait",
        "--timeout",
        "300s",
        check=True,
        timeout=360,
    )
    operator = cluster.wait_for(
        lambda: _ready_pods(cluster, ns, "app.kubernetes.io/component=operator"),
        timeout=120,
        what="operator pod ready",
        namespace=ns,
    )
    assert operator[0]["spec"]["securityContext"].get("runAsNonRoot") or operator[0]["spec"][
        "containers"
    ][0]["securityContext"].get("runAsNonRoot")
    cluster.wait_for(
        lambda: _ready_pods(cluster, ns, "app.kubernetes.io/component=redis"),
        timeout=120,
        what="redis pod ready",
        namespace=ns,
    )
    claim = cluster.get("persistentvolumeclaim", "data-fedfleet-redis-0", ns)
    assert claim is not None and claim["spec"]["volumeName"] == volume, claim
    password = _secret(cluster, ns, "fedfleet-redis", "redis-password")
    # Through the Service's ClusterIP, as the actors reach it (by name): it outlives the pod.
    service = cluster.get("service", "fedfleet-redis", ns)
    assert service is not None
    url = f"redis://:{password}@{service['spec']['clusterIP']}:6379/0"
    test = cluster.helm("test", "fedfleet", "-n", ns, "--timeout", "180s", timeout=240)
    assert test.returncode == 0, test.stdout + test.stderr
    try:
        yield Installed(ns, url)
    finally:
        cluster.helm("uninstall", "fedfleet", "-n", ns, timeout=120)
        cluster.kubectl("delete", "persistentvolume", volume, "--wait=false")


def _example(name: str = "digits", **spec_overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "deploy" / "examples" / f"{name}.yaml").read_text()
    )
    for key, value in spec_overrides.items():
        doc["spec"][key] = (
            {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
        )
    return doc


def _fljob(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    obj = cluster.get("fljob", name, ns)
    assert obj is not None
    return obj


def _stop_fleet(fleet: HttpFleet, runner: threading.Thread) -> None:
    deadline = time.monotonic() + 60
    while runner.is_alive() and time.monotonic() < deadline:
        fleet.stop()  # thread-safe; a no-op until the fleet's loop runs
        runner.join(timeout=1.0)
    if runner.is_alive():
        print("warning: the simulated fleet did not stop within 60 s; left running (daemon)")


def _drive(
    cluster: Cluster,
    ns: str,
    doc: dict[str, Any],
    until: Callable[[dict[str, Any]], bool],
    *,
    timeout: float,
    during: Callable[[dict[str, Any]], None] | None = None,
    fleet_doc: dict[str, Any] | None = None,
    paused: threading.Event | None = None,
) -> dict[str, Any]:
    """Run a simulated fleet against the job's selector pods until ``until(fljob)`` holds.
    ``fleet_doc``: the manifest as the devices see it, when its file paths differ from the
    cluster's (the fleet's data and task code live on this host, not in the pods).
    ``paused``: while it is set the fleet is stopped (the job makes no progress) and the FLJob
    is still watched, so a test can hold the job still while something else happens."""
    name = doc["metadata"]["name"]
    job: FLJob = parse_manifest({**(fleet_doc or doc), "metadata": {"name": name, "namespace": ns}})
    cluster.wait_for(
        lambda: _ready_pods(cluster, ns, f"fedfleet.dev/job={name},fedfleet.dev/role=selector"),
        timeout=180,
        what="selector pods ready",
        namespace=ns,
    )
    keys = JobKeys.from_secret(bytes.fromhex(_secret(cluster, ns, f"{name}-secret", "job-secret")))
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}

    async def main() -> dict[str, Any]:
        nonlocal last
        while time.monotonic() < deadline:
            if paused is not None and paused.is_set():
                last = await asyncio.to_thread(_fljob, cluster, ns, name)
                if until(last):
                    return last
                if during is not None:
                    during(last)
                await asyncio.sleep(1.0)
                continue
            pods = _ready_pods(cluster, ns, f"fedfleet.dev/job={name},fedfleet.dev/role=selector")
            urls = [f"http://{p['status']['podIP']}:8080" for p in pods]
            if not urls:
                # No selector to drive (not up yet, or the job ended and its actors went):
                # the FLJob may already be where the test wants it.
                last = await asyncio.to_thread(_fljob, cluster, ns, name)
                if until(last):
                    return last
                await asyncio.sleep(1)
                continue
            fleet = HttpFleet(
                job,
                urls,
                keys,
                time_scale=0.01,
                rest_seconds=UpOptions().rest_seconds,
                rest_rounds=UpOptions().rest_rounds,
            )
            # The fleet runs on its own thread and loop, so a slow teardown of the fleet (seen
            # once after a job had Succeeded, not yet explained) cannot hold the test's loop;
            # the test waits a bounded time for it and says so if it had to give up.
            runner = threading.Thread(target=asyncio.run, args=(fleet.run(),), daemon=True)
            runner.start()
            try:
                known = {p["metadata"]["name"] for p in pods}
                while time.monotonic() < deadline:
                    await asyncio.sleep(1.0)
                    last = await asyncio.to_thread(_fljob, cluster, ns, name)
                    if until(last):
                        return last
                    if during is not None:
                        during(last)
                    if paused is not None and paused.is_set():
                        break
                    now = {
                        p["metadata"]["name"]
                        for p in _ready_pods(
                            cluster, ns, f"fedfleet.dev/job={name},fedfleet.dev/role=selector"
                        )
                    }
                    # Selector pods changed: restart the fleet on the new set. None left
                    # (suspended, or the job ended and its actors went): keep watching the
                    # FLJob, whose status may reach its end only now (and a TTL may remove it
                    # soon after), until selectors come back.
                    if now and now != known:
                        break
            finally:
                await asyncio.to_thread(_stop_fleet, fleet, runner)
        return last

    final = asyncio.run(main())
    if not until(final):
        pytest.fail(
            f"FLJob {ns}/{name} never got there: {json.dumps(final.get('status'))}\n"
            f"{cluster.diagnostics(ns)}"
        )
    return final


# The simulated fleet as a pod: the job's manifest from a ConfigMap, its secret from the
# Secret, the selectors through the job's Service by its cluster DNS name.
FLEET_SCRIPT = """
import asyncio, os, yaml
from fedfleet.core.spec import parse_manifest
from fedfleet.device.http_fleet import HttpFleet
from fedfleet.service.keys import JobKeys
from fedfleet.up import UpOptions

doc = yaml.safe_load(open("/fleet/job.yaml"))
doc["metadata"] = {"name": os.environ["JOB"], "namespace": os.environ["NAMESPACE"]}
url = os.environ["SELECTORS"]
print("fleet of", doc["spec"]["fleet"]["devices"], "devices against", url, flush=True)
options = UpOptions()
fleet = HttpFleet(
    parse_manifest(doc),
    [url],
    JobKeys.from_secret(bytes.fromhex(os.environ["JOB_SECRET"])),
    time_scale=0.01,
    rest_seconds=options.rest_seconds,
    rest_rounds=options.rest_rounds,
)
asyncio.run(fleet.run())
"""


def _drive_in_cluster(
    cluster: Cluster,
    ns: str,
    doc: dict[str, Any],
    until: Callable[[dict[str, Any]], bool],
    *,
    timeout: float,
) -> tuple[dict[str, Any], str]:
    """Run the simulated fleet as a Job's pod from the services image (uid 65534, read-only
    root) until ``until(fljob)`` holds; the FLJob then, and the fleet pod's log. It reaches the
    selectors as devices reach a job's endpoint: through the job's Service (``<job>-selector``,
    ClientIP affinity), by name."""
    name = doc["metadata"]["name"]
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-fleet"},
            "data": {"job.yaml": yaml.safe_dump(doc), "fleet.py": FLEET_SCRIPT},
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": f"{name}-fleet"},
            "spec": {
                "backoffLimit": 3,
                "template": {
                    "metadata": {"labels": {"app": f"{name}-fleet"}},
                    "spec": {
                        "restartPolicy": "OnFailure",
                        "automountServiceAccountToken": False,
                        "securityContext": {
                            "runAsUser": 65534,
                            "runAsGroup": 65534,
                            "runAsNonRoot": True,
                        },
                        "volumes": [{"name": "fleet", "configMap": {"name": f"{name}-fleet"}}],
                        "containers": [
                            {
                                "name": "fleet",
                                "image": cluster.image("services"),
                                "imagePullPolicy": "IfNotPresent",
                                "command": ["python3", "/fleet/fleet.py"],
                                "env": [
                                    {"name": "JOB", "value": name},
                                    {"name": "NAMESPACE", "value": ns},
                                    {"name": "SELECTORS", "value": f"http://{name}-selector:8080"},
                                    {
                                        "name": "JOB_SECRET",
                                        "valueFrom": {
                                            "secretKeyRef": {
                                                "name": f"{name}-secret",
                                                "key": "job-secret",
                                            }
                                        },
                                    },
                                ],
                                "volumeMounts": [{"name": "fleet", "mountPath": "/fleet"}],
                                "securityContext": {
                                    "readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                            }
                        ],
                    },
                },
            },
        },
    ]
    cluster.apply(objects, ns)
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    try:
        while time.monotonic() < deadline:
            last = _fljob(cluster, ns, name)
            if until(last):
                pods = cluster.list("pods", ns, f"app={name}-fleet")
                logs = [cluster.pod_log(ns, p["metadata"]["name"]) for p in pods]
                return last, "\n".join(logs)
            time.sleep(2)
        pytest.fail(
            f"FLJob {ns}/{name} never got there: {json.dumps(last.get('status'))}\n"
            f"{cluster.diagnostics(ns)}"
        )
    finally:
        cluster.kubectl("delete", "job", f"{name}-fleet", "-n", ns, "--wait=false")


@pytest.mark.timeout(1500)
def test_digits_reaches_succeeded_with_accuracy_in_status(
    cluster: Cluster, fedfleet: Installed, namespace: str, tmp_path: Path
) -> None:
    doc = _example()
    cluster.apply(doc, namespace)
    final, fleet_log = _drive_in_cluster(
        cluster,
        namespace,
        doc,
        lambda j: j.get("status", {}).get("phase") == "Succeeded",
        timeout=1000,  # a hang bound: ~5 min on a quiet machine; 45 rounds in 10 min at load 15
    )
    # The devices were a pod: its log shows the fleet against the job's Service.
    assert "against http://digits-selector:8080" in fleet_log, fleet_log
    status = final["status"]
    assert status["round"] == 50 and status["rounds"] == 50
    assert status["modelVersion"] == 50
    # Real time: the job must reach 0.88 in some committed round; the final model (status)
    # must not have collapsed (non-IID rounds swing by several points: 0.841 was seen).
    assert status["accuracy"] >= 0.80
    assert status["completionTime"] and status["startTime"]
    assert status["observedGeneration"] == final["metadata"]["generation"]
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in status["conditions"])
    assert "digits" in status["model"]["key"]
    table = cluster.kubectl("get", "fljobs", "-n", namespace, check=True).stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "ROUND", "ROUNDS", "ACCURACY", "EPSILON", "STATE", "AGE"]
    assert "Succeeded" in table and "RoundsCompleted" in table
    # Completion tears the actors down and keeps the plan, the secret and the model.
    cluster.wait_for(
        lambda: not cluster.list("deployments", namespace, "fedfleet.dev/job=digits"),
        timeout=60,
        what="actor deployments removed",
        namespace=namespace,
    )
    assert cluster.get("configmap", "digits-plan", namespace) is not None
    store = open_store(fedfleet.redis_url)
    assert store.model_version(f"{namespace}/digits") == 50
    history = store.metrics(f"{namespace}/digits")
    assert max(m["accuracy"] for m in history) >= 0.88
    # The best model (spec.checkpoints defaults: keep 1 + the best by accuracy) is named in
    # the status with the command that fetches it, which holds no password.
    best = max(history, key=lambda m: (m["accuracy"], m["model_version"]))
    assert status["model"]["best"]["version"] == best["model_version"]
    assert f"--store-secret {namespace}/digits-secret" in status["model"]["fetchBest"]
    assert "--version best" in status["model"]["fetchBest"]
    password = urlsplit(fedfleet.redis_url).password
    assert password and password not in json.dumps(status["model"])
    # Delete: children by garbage collection, Redis keys by the finalizer.
    cluster.kubectl("delete", "fljob", "digits", "-n", namespace, "--timeout=60s", check=True)
    cluster.wait_for(
        lambda: (
            cluster.get("configmap", "digits-plan", namespace) is None
            and cluster.get("secret", "digits-secret", namespace) is None
        ),
        timeout=60,
        what="children garbage-collected",
        namespace=namespace,
    )
    assert store.model_version(f"{namespace}/digits") == 0
    assert store.job_state(f"{namespace}/digits") == {}
    # ... and the stored models stay (spec.checkpoints.deleteWithJob is false by default)
    out = tmp_path / "best.safetensors"
    fetch = ["fetch-model", "--store", fedfleet.redis_url, "--job", f"{namespace}/digits"]
    assert cli_main([*fetch, "--version", "best", "-o", str(out)]) == 0
    assert load_weights(out)["w.0"].shape == (64, 10)
    assert cli_main([*fetch, "--version", "50", "-o", str(out)]) == 0
    models_in_store(store).delete_job(f"{namespace}/digits")
    store.close()


@pytest.mark.timeout(900)
def test_a_users_own_task_runs_from_configmap_volumes_to_succeeded(
    cluster: Cluster, fedfleet: Installed, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/custom-numpy (a numpy linear regression, not a built-in task) on the cluster:
    its package and its evaluation file reach the actor pods as ConfigMaps mounted through
    ``spec.actors.volumes`` (``task.path`` and ``evaluation.data`` point into them), the pods
    are rendered with the job's own image, and the job trains to Succeeded with its R²."""
    example = REPO / "examples" / "custom-numpy"
    base: dict[str, Any] = yaml.safe_load((example / "fljob.yaml").read_text())
    cluster.kubectl(
        "create", "configmap", "linreg-task", "-n", namespace,
        f"--from-file={example / 'linreg'}", check=True,
    )  # fmt: skip
    cluster.kubectl(
        "create", "configmap", "linreg-eval", "-n", namespace,
        f"--from-file=test.csv={example / 'data' / 'test.csv'}", check=True,
    )  # fmt: skip
    doc = json.loads(json.dumps(base))
    doc["spec"]["task"]["path"] = "/fedfleet-task"
    doc["spec"]["evaluation"]["data"] = "/fedfleet-eval/test.csv"
    doc["spec"]["actors"] = {
        "selectors": 1,
        "image": "registry.example/acme/linreg-task:0.1.0",
        "volumes": [
            {"name": "task", "mountPath": "/fedfleet-task/linreg", "configMap": "linreg-task"},
            {"name": "eval", "mountPath": "/fedfleet-eval", "configMap": "linreg-eval"},
        ],
    }
    # The devices (this process) have the task installed and their data here.
    fleet_doc = json.loads(json.dumps(doc))
    fleet_doc["spec"]["fleet"]["data"]["path"] = str(example / "data" / "train.csv")
    fleet_doc["spec"]["evaluation"]["data"] = str(example / "data" / "test.csv")
    monkeypatch.syspath_prepend(str(example))
    # The user's image: built FROM fedfleet/services with nothing added (the task's code comes
    # from the ConfigMaps), under the name their registry would serve it by.
    cluster.node.tag_image(cluster.image("services"), "registry.example/acme/linreg-task:0.1.0")
    cluster.apply(doc, namespace)
    pods: list[dict[str, Any]] = []  # the actor pods while the job runs (gone once it ends)

    def look(_: dict[str, Any]) -> None:
        if not pods:
            running = cluster.list("pods", namespace, "fedfleet.dev/job=custom-numpy")
            if {p["metadata"]["labels"]["fedfleet.dev/role"] for p in running} == {
                "coordinator",
                "selector",
                "aggregator",
            }:
                pods.extend(running)

    final = _drive(
        cluster,
        namespace,
        doc,
        lambda j: j.get("status", {}).get("phase") == "Succeeded",
        timeout=600,
        during=look,
        fleet_doc=fleet_doc,
    )
    assert final["status"]["modelVersion"] == 15
    store = open_store(fedfleet.redis_url)
    try:
        metrics = store.metrics(f"{namespace}/custom-numpy")
    finally:
        store.close()
    # Evaluated by the master on the mounted file, with the user's own metric.
    assert len(metrics) == 15 and metrics[-1]["r2"] >= 0.95, metrics[-1]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    # Device metrics, weighted by examples: training loss and federated evaluation.
    assert all("train_loss" in m and "federated_r2" in m for m in metrics)
    # Every actor pod ran the job's own image and mounted both volumes.
    assert pods, "no moment with a coordinator, a selector and an aggregator pod was seen"
    for pod in pods:
        [container] = pod["spec"]["containers"]
        assert container["image"] == "registry.example/acme/linreg-task:0.1.0"
        mounts = {m["mountPath"]: m.get("readOnly") for m in container["volumeMounts"]}
        assert mounts["/fedfleet-task/linreg"] is True and mounts["/fedfleet-eval"] is True


@pytest.mark.timeout(900)
def test_private_job_runs_secure_aggregation_and_stops_at_its_epsilon_budget(
    cluster: Cluster, fedfleet: Installed, namespace: str
) -> None:
    """digits-private.yaml on the cluster, shortened: 20 devices per round and a budget that
    allows 4 rounds (epsilon 1.30 after 4 at z = 1.1, q = 0.1; a 5th would cost 1.39)."""
    doc = _example(
        "digits-private",
        rounds={"total": 50, "goalCount": 20},
        aggregation={
            "secureAggregation": {"enabled": True, "minGroupSize": 10, "phaseTimeoutSeconds": 5},
            "differentialPrivacy": {
                "enabled": True,
                "clipNorm": 1.0,
                "noiseMultiplier": 1.1,
                "delta": 0.001,
                "epsilonBudget": 1.35,
            },
        },
    )
    cluster.apply(doc, namespace)
    store = open_store(fedfleet.redis_url)
    key = f"{namespace}/digits-private"
    try:
        # Driven until the store says the job ended: the FLJob status was once seen stuck at
        # Running after the operator's Succeeded event (unexplained; see the closing note).
        final = _drive(
            cluster,
            namespace,
            doc,
            lambda j: (
                j.get("status", {}).get("phase") == "Succeeded"
                or store.job_state(key).get("phase") == "Succeeded"
            ),
            timeout=420,
        )
        state = store.job_state(key)
        assert (state["phase"], state["reason"]) == ("Succeeded", "epsilon-budget")
        assert store.model_version(key) == 4
        metrics = store.metrics(key)
        assert [round(m["epsilon"], 2) for m in metrics] == [0.95, 1.1, 1.21, 1.3]
        assert all("examples" not in m for m in metrics)
    finally:
        store.close()
    status = final["status"]
    assert 0.9 < status["epsilon"] <= 1.35  # the operator shows epsilon while the job runs
    assert status["lastRound"]["epsilon"] == status["epsilon"]
    table = cluster.kubectl("get", "fljobs", "-n", namespace, check=True).stdout
    assert "EPSILON" in table.splitlines()[0]


@pytest.mark.timeout(1200)
def test_scale_and_suspend_resume_a_running_job(
    cluster: Cluster, fedfleet: Installed, namespace: str
) -> None:
    doc = _example(rounds={"total": 400})
    doc["metadata"] = {"name": "elastic"}
    cluster.apply(doc, namespace)
    _drive(
        cluster,
        namespace,
        doc,
        lambda j: j.get("status", {}).get("modelVersion", 0) >= 3,
        timeout=300,
    )
    cluster.kubectl(
        "patch",
        "fljob",
        "elastic",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"actors": {"selectors": 3}}}),
        check=True,
    )
    cluster.wait_for(
        lambda: (
            (cluster.get("deployment", "elastic-selector", namespace) or {})
            .get("status", {})
            .get("readyReplicas")
            == 3
        ),
        timeout=120,
        what="3 ready selectors",
        namespace=namespace,
    )
    cluster.kubectl(
        "patch",
        "fljob",
        "elastic",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": true}}',
        check=True,
    )
    cluster.wait_for(
        lambda: (
            _fljob(cluster, namespace, "elastic").get("status", {}).get("phase") == "Suspended"
            and not cluster.list("pods", namespace, "fedfleet.dev/job=elastic")
        ),
        timeout=120,
        what="suspended with no actor pods",
        namespace=namespace,
    )
    store = open_store(fedfleet.redis_url)
    kept = store.model_version(f"{namespace}/elastic")
    assert kept >= 3
    cluster.kubectl(
        "patch",
        "fljob",
        "elastic",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": false}}',
        check=True,
    )
    final = _drive(
        cluster,
        namespace,
        doc,
        lambda j: j.get("status", {}).get("modelVersion", 0) >= kept + 3,
        timeout=300,
    )
    assert final["status"]["phase"] == "Running"
    assert store.model_version(f"{namespace}/elastic") >= kept + 3  # continued, not restarted
    store.close()


CHAOS_TIMEOUTS = {"selectionTimeoutSeconds": 20, "reportingTimeoutSeconds": 20}
"""Round timeouts of the jobs the chaos tests break: a round whose reports were lost (an
aggregator's container killed, the devices held while the operator is replaced) is abandoned
and run again after 20 s, not after the example's 120 s for real devices. Rounds here take
about a second."""


def _twenty_rounds_through(
    cluster: Cluster,
    fedfleet: Installed,
    ns: str,
    name: str,
    chaos: Callable[[int, Store], None],
) -> dict[str, Any]:
    """The digits job at 20 rounds, named ``name``, driven to Succeeded while ``chaos`` gets
    each committed version the test reads from the store (and the store), whenever it can
    read one. Asserts what every chaos test here must keep: the last round is reached and no
    committed version is ever read lower than one read before it. Returns the final FLJob."""
    doc = _example(rounds={"total": 20, **CHAOS_TIMEOUTS})
    doc["metadata"] = {"name": name}
    cluster.apply(doc, ns)
    store = open_store(fedfleet.redis_url)
    seen: list[int] = []

    def look(_: dict[str, Any]) -> None:
        try:
            seen.append(store.model_version(f"{ns}/{name}"))
        except StoreUnavailable:
            return  # the store is on its way back (the Redis test)
        chaos(seen[-1], store)

    try:
        final = _drive(
            cluster,
            ns,
            doc,
            lambda j: j.get("status", {}).get("phase") == "Succeeded",
            timeout=900,
            during=look,
        )
    finally:
        store.close()
    assert final["status"]["modelVersion"] == 20
    assert seen == sorted(seen), f"a committed version went backwards: {seen}"
    return final


@pytest.mark.timeout(1200)
def test_coordinator_pod_deleted_mid_job_finishes_without_losing_a_version(
    cluster: Cluster, fedfleet: Installed, namespace: str
) -> None:
    deleted: list[str] = []

    def chaos(version: int, store: Store) -> None:
        if not deleted and version >= 5:
            lease = store.lease(f"{namespace}/resilient")
            assert lease is not None
            cluster.kubectl(
                "delete", "pod", lease.holder, "-n", namespace, "--wait=false", check=True
            )
            deleted.append(lease.holder)

    _twenty_rounds_through(cluster, fedfleet, namespace, "resilient", chaos)
    assert deleted, "the active coordinator was never deleted"


def _operator_pods(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    return _ready_pods(cluster, ns, "app.kubernetes.io/component=operator")


def _kill_operator(cluster: Cluster, ns: str) -> str:
    """Delete the operator's pod (SIGTERM, as a rollout or an eviction does); its Deployment
    starts a replacement, which takes over through kopf peering."""
    [pod] = _operator_pods(cluster, ns)
    name = str(pod["metadata"]["name"])
    cluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=True)
    return name


def _replacement_ready(cluster: Cluster, ns: str, gone: list[str]) -> str:
    pod = cluster.wait_for(
        lambda: next(
            (p for p in _operator_pods(cluster, ns) if p["metadata"]["name"] not in gone), None
        ),
        timeout=180,
        what="a replacement operator pod ready",
        namespace=ns,
    )
    return str(pod["metadata"]["name"])


@pytest.mark.timeout(1200)
def test_operator_killed_mid_job_and_at_completion_leaves_the_status_right(
    cluster: Cluster, fedfleet: Installed, namespace: str
) -> None:
    """The status that once stuck at Running: kill the operator while the job runs, and again
    the moment the store says the job finished; once a replacement has taken over, the
    FLJob's status must follow the store (progress, then Succeeded, the actors gone).

    The devices are held from the first kill until the replacement has reported the store's
    version, so the job is still running when it takes over however fast rounds are (a run
    whose remaining rounds took less than the status interval once failed this test)."""
    doc = _example(rounds={"total": 30, **CHAOS_TIMEOUTS})
    doc["metadata"] = {"name": "steady"}
    cluster.apply(doc, namespace)
    key = f"{namespace}/steady"
    store = open_store(fedfleet.redis_url)
    killed: list[str] = []
    at_takeover: list[int] = []  # the store's version when the replacement became ready
    reported: list[int] = []  # the status's version from then on
    hold = threading.Event()
    held_since: list[float] = []

    def chaos(job: dict[str, Any]) -> None:
        version = store.model_version(key)
        if not killed:
            if version >= 3:
                hold.set()  # no progress until the replacement has caught up
                held_since.append(time.monotonic())
                killed.append(_kill_operator(cluster, fedfleet.namespace))
            return
        if len(killed) == 1 and not at_takeover:
            names = {p["metadata"]["name"] for p in _operator_pods(cluster, fedfleet.namespace)}
            if names - set(killed):
                at_takeover.append(version)
            return
        if len(killed) == 1:
            reported.append(job.get("status", {}).get("modelVersion", 0))
            if hold.is_set():
                pods = {p["metadata"]["name"] for p in _operator_pods(cluster, fedfleet.namespace)}
                if reported[-1] >= at_takeover[0] and killed[0] not in pods:
                    hold.clear()  # the replacement follows the store: let the job go on
                elif time.monotonic() - held_since[0] > 180:
                    pytest.fail(
                        f"the replacement operator never reported version {at_takeover[0]} "
                        f"(status still at {reported[-1]} after 180 s)"
                    )
            elif store.job_state(key).get("phase") == "Succeeded":
                killed.append(_kill_operator(cluster, fedfleet.namespace))

    try:
        _drive(
            cluster,
            namespace,
            doc,
            lambda j: len(killed) == 2,
            timeout=900,
            during=chaos,
            paused=hold,
        )
        assert store.job_state(key)["phase"] == "Succeeded"
        # The first replacement caught up with the store and kept reporting, mid-job.
        assert at_takeover and reported, "the job finished before the replacement took over"
        assert max(reported) >= at_takeover[0]
        _replacement_ready(cluster, fedfleet.namespace, killed)
        final = cluster.wait_for(
            lambda: (
                (job := _fljob(cluster, namespace, "steady")).get("status", {}).get("phase")
                == "Succeeded"
                and job
            ),
            timeout=120,
            what="status Succeeded after the operator was replaced",
            namespace=namespace,
        )
    finally:
        store.close()
    status = final["status"]
    assert (status["round"], status["modelVersion"]) == (30, 30)
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert (complete["status"], complete["reason"]) == ("True", "RoundsCompleted")
    assert status["conditions"][-1]["type"] == "Complete"
    cluster.wait_for(
        lambda: not cluster.list("deployments", namespace, "fedfleet.dev/job=steady"),
        timeout=60,
        what="actor deployments removed",
        namespace=namespace,
    )


@pytest.mark.timeout(900)
def test_deadline_ends_a_job_failed_and_its_ttl_removes_it_keeping_the_model(
    cluster: Cluster, fedfleet: Installed, namespace: str
) -> None:
    doc = _example(rounds={"total": 400}, activeDeadlineSeconds=60, ttlSecondsAfterFinished=15)
    doc["metadata"] = {"name": "bounded"}
    cluster.apply(doc, namespace)
    key = f"{namespace}/bounded"
    store = open_store(fedfleet.redis_url)
    try:
        final = _drive(
            cluster,
            namespace,
            doc,
            lambda j: j.get("status", {}).get("phase") == "Failed",
            timeout=400,
        )
        failed = final["status"]["conditions"][-1]
        assert (failed["type"], failed["status"], failed["reason"]) == (
            "Failed",
            "True",
            "DeadlineExceeded",
        )
        state = store.job_state(key)
        assert (state["phase"], state["reason"]) == ("Failed", "deadline-exceeded")
        assert store.model_version(key) < 400
        # ttlSecondsAfterFinished: the children, then the FLJob, go; the store keeps the job.
        cluster.wait_for(
            lambda: (
                cluster.get("fljob", "bounded", namespace) is None
                and cluster.get("configmap", "bounded-plan", namespace) is None
                and not cluster.list("deployments", namespace, "fedfleet.dev/job=bounded")
            ),
            timeout=120,
            what="the FLJob and its children removed by its TTL",
            namespace=namespace,
        )
        assert store.job_state(key)["phase"] == "Failed"
        store.delete_job(key)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"aggregation": {"algorithm": "fedsgd"}}, "spec.aggregation.algorithm"),
        ({"rounds": {"goalCount": -5}}, "spec.rounds.goalCount"),
        ({"population": None}, "spec.population"),
    ],
)
def test_invalid_manifests_are_refused_by_the_api_server_naming_the_field(
    cluster: Cluster, fedfleet: Installed, namespace: str, patch: dict[str, Any], field: str
) -> None:
    doc = _example()
    for key, value in patch.items():
        if value is None:
            doc["spec"].pop(key)
        else:
            doc["spec"][key] = {**doc["spec"][key], **value}
    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    assert proc.returncode != 0
    assert field in proc.stderr, proc.stderr
    assert cluster.get("fljob", "digits", namespace) is None


def test_cross_field_invalid_spec_gets_an_invalid_condition_and_no_children(
    cluster: Cluster, fedfleet: Installed, namespace: str
) -> None:
    doc = _example(rounds={"goalCount": 500})  # more than fleet.devices (200)
    doc["metadata"] = {"name": "impossible"}
    cluster.apply(doc, namespace)
    job = cluster.wait_for(
        lambda: next(
            (
                c
                for c in _fljob(cluster, namespace, "impossible")
                .get("status", {})
                .get("conditions", [])
                if c["type"] == "Invalid" and c["status"] == "True"
            ),
            None,
        ),
        timeout=60,
        what="Invalid condition",
        namespace=namespace,
    )
    assert "goalCount" in job["message"]
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json", check=True).stdout
    assert any(
        e["type"] == "Warning" and e["involvedObject"]["name"] == "impossible"
        for e in json.loads(events)["items"]
    )
    assert not cluster.list("deployments", namespace, "fedfleet.dev/job=impossible")


def test_kubectl_explain_documents_the_spec(cluster: Cluster, fedfleet: Installed) -> None:
    out = cluster.kubectl("explain", "fljob.spec.rounds.goalCount", check=True).stdout
    assert "Reports needed to close a round" in out
    out = cluster.kubectl("explain", "fljob.spec.aggregation", check=True).stdout
    assert "algorithm" in out and "fedyogi" in out


def _pool(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(_fljob(cluster, ns, name).get("status", {}).get("aggregators") or {})


def _aggregator_pods(cluster: Cluster, ns: str, name: str) -> set[str]:
    return {
        p["metadata"]["name"]
        for p in cluster.list("pods", ns, f"fedfleet.dev/job={name},fedfleet.dev/role=aggregator")
    }


@pytest.mark.timeout(1500)
def test_a_ten_times_larger_model_gets_more_aggregators_and_the_pool_shrinks_again(
    cluster: Cluster, fedfleet: Installed, namespace: str
) -> None:
    """Sizing by update bytes (operator/CONTRACT.md, "Aggregator pool"): no fleet is needed,
    the aggregators publish the model's update size as soon as they run, and rounds of 8 s
    (the selection timeout, until one commits) of 26 devices set the bytes to fold."""
    actors = {
        "selectors": 1,
        "devicesPerAggregator": 26,  # one aggregator by devices, for both jobs
        "maxAggregators": 6,
        "aggregatorBytesPerSecond": 16 * 1024,
        "scaleDownStabilizationSeconds": 0,
    }
    rounds = {"total": 400, "selectionTimeoutSeconds": 8}
    small = _example(rounds=rounds, actors=actors)
    small["metadata"] = {"name": "pool-small"}
    large = _example(rounds=rounds, actors=actors, model={"kind": "mlp", "hidden": [86]})
    large["metadata"] = {"name": "pool-large"}  # 6,460 parameters: 9.9x the softmax's 650
    # One job at a time: every pod is a container on this one node of a shared 2-core machine.
    cluster.apply(small, namespace)
    small_pool = cluster.wait_for(
        lambda: (p := _pool(cluster, namespace, "pool-small")).get("current") == 1 and p,
        timeout=420,
        what="the small model's aggregator registered and sized",
        namespace=namespace,
    )
    assert small_pool["replicas"] == small_pool["desired"] == 1, small_pool  # 26 x 2.6 kB / 8 s
    cluster.kubectl("delete", "fljob", "pool-small", "-n", namespace, "--wait=false", check=True)
    cluster.apply(large, namespace)
    # 26 x 25.8 kB / 8 s = 82 kB/s: six at 16 KiB/s.
    grown = cluster.wait_for(
        lambda: (p := _pool(cluster, namespace, "pool-large")).get("replicas") == 6 and p,
        timeout=420,
        what="the large model's pool at 6 aggregators",
        namespace=namespace,
    )
    assert "bytes" in grown["reason"]
    cluster.wait_for(
        lambda: _pool(cluster, namespace, "pool-large").get("current") == 6,
        timeout=420,
        what="6 aggregators of the large model registered",
        namespace=namespace,
    )
    # Selection shrinks to 7 devices a round: 22 kB/s, two aggregators.
    cluster.kubectl(
        "patch", "fljob", "pool-large", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"rounds": {"goalCount": 5}}}), check=True,
    )  # fmt: skip
    drained = cluster.wait_for(
        lambda: (
            (p := _pool(cluster, namespace, "pool-large")).get("desired") == 2
            and (p.get("draining") or p.get("leaving"))
            and p
        ),
        timeout=180,
        what="the large model's pool draining to 2",
        namespace=namespace,
    )
    going = set(drained.get("draining") or []) | set(drained.get("leaving") or [])
    # Four go; a replica whose registration lapsed (a slow heartbeat on a loaded node) goes
    # first without a drain, as one that never registered would.
    assert 1 <= len(going) <= 4, drained
    store = open_store(fedfleet.redis_url)
    try:
        # The pool ends at two aggregator pods, neither of them draining: the drained ones'
        # pods go (lowest pod-deletion-cost); when the ReplicaSet takes another pod first (a
        # pod not ready: the spec patch also rolled the pods, so the drains may name pods of
        # either ReplicaSet), the drained one that stays is taken off the draining set and
        # serves again (operator/fedfleet_operator/pool.py).
        def settled() -> set[str] | None:
            replicas = (
                (cluster.get("deployment", "pool-large-aggregator", namespace) or {})
                .get("spec", {})
                .get("replicas")
            )
            pods = _aggregator_pods(cluster, namespace, "pool-large")
            draining = store.draining(f"{namespace}/pool-large")
            return pods if replicas == 2 and len(pods) == 2 and draining.isdisjoint(pods) else None

        cluster.wait_for(
            settled,
            timeout=300,
            what="the pool down to 2 aggregator pods, neither draining",
            namespace=namespace,
        )
    finally:
        store.close()
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json", check=True)
    reasons = {e.get("reason") for e in json.loads(events.stdout)["items"]}
    assert {"AggregatorsScaledUp", "AggregatorsDraining", "AggregatorsScaledDown"} <= reasons


# -- real-runtime chaos: containers killed by signal, the store's pod deleted -------------------


def _sigkill_container(cluster: Cluster, pod: dict[str, Any]) -> int:
    """SIGKILL the process of the pod's (first) container from the host, as the kernel's OOM
    killer or a crash would end it: containerd's task list gives its pid."""
    [status] = pod["status"]["containerStatuses"]
    container_id = status["containerID"].removeprefix("containerd://")
    tasks = subprocess.run(
        [*cluster.node.ctr_cmd, "tasks", "ls"], capture_output=True, text=True, check=True
    ).stdout
    pids = [int(f[1]) for f in (ln.split() for ln in tasks.splitlines()) if f[0] == container_id]
    assert pids, f"no containerd task {container_id} in:\n{tasks}"
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


@pytest.mark.timeout(1200)
def test_selector_and_aggregator_containers_sigkilled_are_restarted_and_the_job_finishes(
    cluster: Cluster, fedfleet: Installed, namespace: str
) -> None:
    """A selector's and then an aggregator's container process is SIGKILLed mid-job; the
    kubelet restarts each container in its pod (exit 137 recorded), and the job still reaches
    its last round with its committed versions never going backwards."""
    killed: dict[str, str] = {}  # role -> pod name
    restarted: dict[str, dict[str, Any]] = {}  # role -> the container's status after restart

    def chaos(version: int, _: Store) -> None:
        for role, at in (("selector", 3), ("aggregator", 8)):
            if role not in killed and version >= at and len(killed) == len(restarted):
                pods = _ready_pods(
                    cluster, namespace, f"fedfleet.dev/job=sigkilled,fedfleet.dev/role={role}"
                )
                if pods:
                    _sigkill_container(cluster, pods[0])
                    killed[role] = pods[0]["metadata"]["name"]
        for role, name in killed.items():
            pod = cluster.get("pod", name, namespace) or {}
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                if cs["restartCount"] >= 1 and "running" in cs["state"]:
                    restarted.setdefault(role, cs)

    _twenty_rounds_through(cluster, fedfleet, namespace, "sigkilled", chaos)
    assert set(killed) == {"selector", "aggregator"}, f"killed only {killed}"
    assert set(restarted) == set(killed), f"restarts seen: {restarted}, killed: {killed}"
    for role, cs in restarted.items():
        # The same pod, its container restarted by the kubelet after a SIGKILL (128 + 9).
        assert cs["lastState"]["terminated"]["exitCode"] == 137, (role, cs)


@pytest.mark.timeout(1200)
def test_bundled_redis_pod_deleted_mid_job_keeps_every_committed_version(
    cluster: Cluster, fedfleet: Installed, namespace: str
) -> None:
    """The chart's Redis pod is deleted mid-job. Its StatefulSet starts a new pod on the same
    PersistentVolume (append-only file, fsync always), the actors reconnect through the
    Service, and the job finishes from where it was: no committed version is lost."""
    deleted: list[str] = []  # the deleted pod's uid

    def chaos(version: int, _: Store) -> None:
        if not deleted and version >= 5:
            pod = cluster.get("pod", "fedfleet-redis-0", fedfleet.namespace)
            assert pod is not None
            cluster.kubectl(
                "delete", "pod", "fedfleet-redis-0", "-n", fedfleet.namespace, "--wait=false",
                check=True,
            )  # fmt: skip
            deleted.append(pod["metadata"]["uid"])

    _twenty_rounds_through(cluster, fedfleet, namespace, "redis-restart", chaos)
    assert deleted, "the Redis pod was never deleted"
    pod = cluster.get("pod", "fedfleet-redis-0", fedfleet.namespace)
    assert pod is not None and pod["metadata"]["uid"] != deleted[0], "no new Redis pod"
    # What each commit recorded before the restart is still there: one metrics row per
    # committed version, none lost and none repeated.
    store = open_store(fedfleet.redis_url)
    try:
        metrics = store.metrics(f"{namespace}/redis-restart")
    finally:
        store.close()
    assert len(metrics) == 20, metrics
