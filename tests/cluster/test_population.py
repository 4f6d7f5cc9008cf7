"""One endpoint per population on a real control plane: an FLPopulation and real devices.

The chart is installed as in ``test_fedfleet_on_kubernetes.py`` (its ``fedfleet`` fixture). An
``FLPopulation`` is applied; the operator makes its enrollment Secret, its gateway (Deployment
and Secret) and its Service ``<name>-devices`` over the gateway pod, which is Ready before any
job exists. Four ``fedfleet device run`` processes on this host enroll with the token read from
the Secret and talk to that Service only (its ClusterIP, which kube-proxy on the real node
routes from this host as from any pod); with no job running the gateway answers
their check-ins with a reconnect window. Two FLJobs of the population run one after the other;
the same device processes, with no new token or URL, train both. Deleting the jobs leaves the
endpoint and the same gateway pod Ready; deleting the FLPopulation removes them all.

A second, shorter test: an FLJob created before its FLPopulation, whose selector the
FLPopulation's creation makes serve it (labelled, announced to the gateway), and the same
FLPopulation then patched with ``spec.gateway.tls``: its gateway rolls to https (https probes),
refuses plain http, and a device that trusts the test's CA enrolls and is selected by that job.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedfleet.device.datasets import load_dataset
from fedfleet.gateway.routes import route_scope
from fedfleet.service.enrollment import enroll_token
from fedfleet.store.factory import open_store
from tests.cluster import test_fedfleet_on_kubernetes as base
from tests.cluster.conftest import Cluster
from tests.device_processes import FedfleetProcess, population_job
from tests.tls_certificates import certificate

pytestmark = pytest.mark.cluster

fedfleet = base.fedfleet  # the chart, installed once for this module
POP = "edge-k8s"
DEVICES = 4


def _fljob(name: str) -> dict[str, Any]:
    return population_job(name, POP, total=3, goal=2, devices=DEVICES, timeout=60)


def _wait(
    cluster: Cluster,
    namespace: str,
    what: str,
    probe: Callable[[], Any],
    devices: list[FedfleetProcess],
    timeout: float,
) -> Any:
    """Poll ``probe`` until truthy; fail at once if a device process died, with diagnostics
    and the devices' logs when time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        for d in devices:
            if d.proc.poll() is not None:
                pytest.fail(
                    f"device {d.log.stem} exited {d.proc.returncode} while waiting for "
                    f"{what}:\n{d.text()[-4000:]}\n{cluster.diagnostics(namespace)}"
                )
        time.sleep(1.0)
    tails = "\n".join(f"--- {d.log.name}\n{d.text()[-2000:]}" for d in devices)
    pytest.fail(f"timed out waiting for {what}\n{tails}\n{cluster.diagnostics(namespace)}")


def _service_address(cluster: Cluster, namespace: str, name: str) -> str | None:
    """``clusterIP:port`` of the Service once a TCP connection to it reaches a ready endpoint
    (kube-proxy has programmed it): the address a device outside the pods uses here."""
    service = cluster.get("service", name, namespace) or {}
    ip = (service.get("spec") or {}).get("clusterIP")
    ports = (service.get("spec") or {}).get("ports") or []
    if not ip or ip == "None" or not ports:
        return None
    address = f"{ip}:{ports[0]['port']}"
    try:
        socket.create_connection((ip, int(ports[0]["port"])), timeout=2).close()
    except OSError:
        return None
    return address


def _gateway(cluster: Cluster, namespace: str) -> tuple[str, str] | None:
    """(Deployment uid, pod uid) of the population's gateway when its one replica is Ready."""
    deployment = cluster.get("deployment", f"{POP}-gateway", namespace) or {}
    if (deployment.get("status") or {}).get("readyReplicas") != 1:
        return None
    pods = base._ready_pods(
        cluster, namespace, f"fedfleet.dev/population={POP},fedfleet.dev/role=gateway"
    )
    if len(pods) != 1:
        return None
    return str(deployment["metadata"]["uid"]), str(pods[0]["metadata"]["uid"])


def _no_job_windows(devices: list[FedfleetProcess]) -> list[int]:
    """How many reconnect windows each device got because no job of the population ran: only
    the gateway answers so."""
    return [d.text().count("check-in: reconnect (no-job)") for d in devices]


def _phase(cluster: Cluster, namespace: str, name: str) -> str | None:
    job = cluster.get("fljob", name, namespace) or {}
    phase = job.get("status", {}).get("phase")
    return str(phase) if phase else None


@pytest.mark.timeout(1800)
def test_devices_on_one_population_endpoint_train_two_jobs_in_turn(
    cluster: Cluster, fedfleet: base.Installed, namespace: str, tmp_path: Path
) -> None:
    cluster.apply(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLPopulation",
            "metadata": {"name": POP},
            "spec": {},
        },
        namespace,
    )
    secret = cluster.wait_for(
        lambda: cluster.get("secret", f"{POP}-enrollment", namespace),
        timeout=120,
        what="the population's enrollment Secret",
        namespace=namespace,
    )
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    token = data["enroll-token"]
    assert token == enroll_token(bytes.fromhex(data["population-secret"]))
    service = cluster.wait_for(
        lambda: cluster.get("service", f"{POP}-devices", namespace),
        timeout=60,
        what="the population's Service",
        namespace=namespace,
    )
    # Routing is by ticket, not by connection: the Service selects the gateway pods only.
    assert service["spec"]["sessionAffinity"] == "None"
    assert service["spec"]["selector"] == {
        "fedfleet.dev/population": POP,
        "fedfleet.dev/role": "gateway",
    }
    # The gateway runs, Ready, before any job exists.
    gateway = cluster.wait_for(
        lambda: _gateway(cluster, namespace),
        timeout=240,
        what="the population's gateway Ready",
        namespace=namespace,
    )
    deployment = cluster.get("deployment", f"{POP}-gateway", namespace)
    gateway_secret = cluster.get("secret", f"{POP}-gateway", namespace)
    assert deployment is not None and gateway_secret is not None
    # Its own copy of the store's password: the one the chart gave the operator.
    assert base._secret(cluster, namespace, f"{POP}-gateway", "redis-password") == (
        base._secret(cluster, fedfleet.namespace, "fedfleet-redis", "redis-password")
    )
    for child in (secret, service, deployment, gateway_secret):
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"]) == ("FLPopulation", POP)
    population = cluster.wait_for(
        lambda: (
            (p := cluster.get("flpopulation", POP, namespace) or {})
            .get("status", {})
            .get("endpoint")
            and p
        ),
        timeout=60,
        what="the FLPopulation's status",
        namespace=namespace,
    )
    assert population["status"]["endpoint"] == f"http://{POP}-devices.{namespace}.svc:8080"
    assert population["status"]["enrollmentSecret"] == f"{POP}-enrollment"
    address = cluster.wait_for(
        lambda: _service_address(cluster, namespace, f"{POP}-devices"),
        timeout=60,
        what="the population's Service reachable at its ClusterIP",
        namespace=namespace,
    )
    url = f"http://{address}"
    # Behind the Service with no job at all: only the gateway can answer.
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200

    # Four devices, each with its own slice of digits, started before any job exists: the
    # gateway enrolls them and, as no job runs, answers their check-ins with a reconnect window.
    x, y = load_dataset("digits")  # type: ignore[arg-type]
    slices = np.array_split(np.random.default_rng(0).permutation(len(y)), DEVICES)
    conditions = tmp_path / "conditions.json"
    conditions.write_text(json.dumps({"charging": True, "idle": True, "unmetered": True}))
    devices: list[FedfleetProcess] = []
    store = open_store(fedfleet.redis_url)
    try:
        for i in range(DEVICES):
            npz = tmp_path / f"device-{i}.npz"
            np.savez(npz, x=x[slices[i]], y=y[slices[i]])
            state = tmp_path / f"state-{i}"
            devices.append(
                FedfleetProcess(
                    [
                        "device", "run", "--server", url, "--population", POP,
                        "--enroll-token", token, "--data", str(npz), "--state", str(state),
                        "--conditions", str(conditions),
                    ],
                    tmp_path / f"device-{i}.log",
                    state,
                )
            )  # fmt: skip

        def enrolled() -> list[str] | None:
            found = [d.identity().get("device_id") for d in devices]
            return [str(i) for i in found] if all(found) else None

        ids: list[str] = _wait(cluster, namespace, "every device enrolled", enrolled, devices, 240)
        assert len(set(ids)) == DEVICES, ids
        _wait(
            cluster,
            namespace,
            "a reconnect window from the gateway with no job running",
            lambda: any(_no_job_windows(devices)),
            devices,
            240,
        )

        # Job A: its selector serves the population, and the devices train it.
        cluster.apply(_fljob("pop-a"), namespace)
        selector = cluster.wait_for(
            lambda: base._ready_pods(
                cluster, namespace, f"fedfleet.dev/population={POP},fedfleet.dev/role=selector"
            ),
            timeout=240,
            what="a selector pod of job A serving the population",
            namespace=namespace,
        )
        assert selector[0]["metadata"]["labels"]["fedfleet.dev/job"] == "pop-a"
        listed: list[list[str]] = []

        def a_succeeded() -> bool:
            pop = cluster.get("flpopulation", POP, namespace) or {}
            listed.append(list(pop.get("status", {}).get("jobs") or []))
            return _phase(cluster, namespace, "pop-a") == "Succeeded"

        _wait(cluster, namespace, "job A Succeeded", a_succeeded, devices, 900)
        assert store.model_version(f"{namespace}/pop-a") == 3
        assert ["pop-a"] in listed, listed  # the population showed its running job
        # Deleting the finished job leaves the population's endpoint as it was.
        cluster.kubectl("delete", "fljob", "pop-a", "-n", namespace, "--timeout=60s", check=True)
        assert (cluster.get("secret", f"{POP}-enrollment", namespace) or {}).get("data") == secret[
            "data"
        ]
        kept = cluster.get("service", f"{POP}-devices", namespace)
        assert kept is not None and kept["metadata"]["uid"] == service["metadata"]["uid"]
        assert _gateway(cluster, namespace) == gateway  # the same pod, still Ready
        reported_before = [d.text().count(": reported") for d in devices]

        # Job B of the same population: the same processes, no new token or URL.
        cluster.apply(_fljob("pop-b"), namespace)
        _wait(
            cluster,
            namespace,
            "job B Succeeded",
            lambda: _phase(cluster, namespace, "pop-b") == "Succeeded",
            devices,
            900,
        )
        assert store.model_version(f"{namespace}/pop-b") == 3
        for d, device_id in zip(devices, ids, strict=True):
            assert d.identity()["device_id"] == device_id
            assert d.text().count("enrolled as") == 1, d.text()[-2000:]  # never again
        # These four are the only devices there are: they trained job B.
        reported_after = [d.text().count(": reported") for d in devices]
        assert sum(reported_after) - sum(reported_before) >= 3, (reported_before, reported_after)
        assert _service_address(cluster, namespace, f"{POP}-devices") == address
        # With both jobs deleted, the same gateway pod still serves the endpoint.
        cluster.kubectl("delete", "fljob", "pop-b", "-n", namespace, "--timeout=60s", check=True)
        cluster.wait_for(
            lambda: (
                not cluster.list(
                    "pods", namespace, f"fedfleet.dev/population={POP},fedfleet.dev/role=selector"
                )
            ),
            timeout=120,
            what="job B's selector pods gone",
            namespace=namespace,
        )
        assert _gateway(cluster, namespace) == gateway
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        store.close()
        stopped = [d.stop() if d.proc.poll() is None else d.proc.returncode for d in devices]
    assert stopped == [0] * DEVICES, [d.text()[-1500:] for d in devices]

    # Deleting the FLPopulation removes its Secrets, gateway and Service (garbage collection).
    cluster.kubectl("delete", "flpopulation", POP, "-n", namespace, "--timeout=60s", check=True)
    cluster.wait_for(
        lambda: all(
            cluster.get(kind, name, namespace) is None
            for kind, name in (
                ("secret", f"{POP}-enrollment"),
                ("secret", f"{POP}-gateway"),
                ("deployment", f"{POP}-gateway"),
                ("service", f"{POP}-devices"),
            )
        ),
        timeout=120,
        what="the population's Secrets, gateway and Service garbage-collected",
        namespace=namespace,
    )


def _https_healthy(url: str, context: ssl.SSLContext) -> bool:
    try:
        return httpx.get(f"{url}/healthz", verify=context, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(900)
def test_a_job_created_first_joins_its_population_whose_gateway_then_serves_https(
    cluster: Cluster, fedfleet: base.Installed, namespace: str, tmp_path: Path
) -> None:
    pop, job = "edge-tls", "early"
    selector_pods = f"fedfleet.dev/job={job},fedfleet.dev/role=selector"
    cluster.apply(population_job(job, pop, total=1, goal=2, devices=2, timeout=120), namespace)
    [plain] = cluster.wait_for(
        lambda: base._ready_pods(cluster, namespace, selector_pods),
        timeout=240,
        what="the selector of a job whose population does not exist",
        namespace=namespace,
    )
    assert "fedfleet.dev/population" not in plain["metadata"]["labels"]

    # The FLPopulation's creation makes the running job's selector serve it: a new selector
    # pod, labelled, that announces itself to the population's gateway.
    population = {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLPopulation",
        "metadata": {"name": pop},
        "spec": {},
    }
    cluster.apply(population, namespace)
    [served] = cluster.wait_for(
        lambda: base._ready_pods(
            cluster, namespace, f"{selector_pods},fedfleet.dev/population={pop}"
        ),
        timeout=240,
        what="the job's selector serving the population created after it",
        namespace=namespace,
    )
    assert served["metadata"]["uid"] != plain["metadata"]["uid"]
    secret = bytes.fromhex(
        base._secret(cluster, namespace, f"{pop}-enrollment", "population-secret")
    )
    store = open_store(fedfleet.redis_url)
    try:
        cluster.wait_for(
            lambda: any(
                json.loads(entry)["job"] == f"{namespace}/{job}"
                for entry in store.population_routes(route_scope(pop, secret)).values()
            ),
            timeout=60,
            what="the job's selector announced to the population's gateway",
            namespace=namespace,
        )
    finally:
        store.close()

    # The same FLPopulation patched with a kubernetes.io/tls Secret of the test's CA, made for
    # the Service's ClusterIP (and the in-cluster name).
    address = cluster.wait_for(
        lambda: _service_address(cluster, namespace, f"{pop}-devices"),
        timeout=60,
        what="the population's Service reachable at its ClusterIP",
        namespace=namespace,
    )
    host = address.rsplit(":", 1)[0]
    ca, cert, key = certificate(tmp_path, [host, f"{pop}-devices.{namespace}.svc"])
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": f"{pop}-tls"},
            "type": "kubernetes.io/tls",
            "data": {
                "tls.crt": base64.b64encode(cert.read_bytes()).decode(),
                "tls.key": base64.b64encode(key.read_bytes()).decode(),
            },
        },
        namespace,
    )
    population["spec"] = {"gateway": {"tls": {"secretName": f"{pop}-tls"}}}
    cluster.apply(population, namespace)
    url = f"https://{address}"
    context = ssl.create_default_context(cafile=str(ca))

    def rolled() -> bool:
        deployment = cluster.get("deployment", f"{pop}-gateway", namespace) or {}
        status = deployment.get("status") or {}
        pods = cluster.list(
            "pods", namespace, f"fedfleet.dev/population={pop},fedfleet.dev/role=gateway"
        )
        return (
            status.get("observedGeneration") == deployment["metadata"]["generation"]
            and status.get("updatedReplicas") == status.get("readyReplicas") == 1
            and len(pods) == 1  # the plain-http pod is gone
            and _https_healthy(url, context)
        )

    cluster.wait_for(rolled, timeout=240, what="the gateway serving https", namespace=namespace)
    gateway = cluster.get("deployment", f"{pop}-gateway", namespace) or {}
    [container] = gateway["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    endpoint = cluster.wait_for(
        lambda: (
            (
                (cluster.get("flpopulation", pop, namespace) or {})
                .get("status", {})
                .get("endpoint")
                or ""
            ).startswith("https://")
            or None
        ),
        timeout=60,
        what="the FLPopulation's https endpoint",
        namespace=namespace,
    )
    assert endpoint
    with pytest.raises(httpx.HTTPError):  # https only: a plain request gets no answer
        httpx.get(f"http://{address}/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):  # and a client that does not trust the CA refuses
        httpx.get(f"{url}/healthz", timeout=5)

    # A device that trusts the CA enrolls through the gateway (which relays to the joined
    # job's selector, holding the population secret) and that job selects it.
    data = base._secret(cluster, namespace, f"{pop}-enrollment", "enroll-token")
    x, y = load_dataset("digits")  # type: ignore[arg-type]
    npz, state = tmp_path / "device.npz", tmp_path / "state"
    np.savez(npz, x=x[:100], y=y[:100])
    conditions = tmp_path / "conditions.json"
    conditions.write_text(json.dumps({"charging": True, "idle": True, "unmetered": True}))
    device = FedfleetProcess(
        [
            "device", "run", "--server", url, "--ca-file", str(ca), "--population", pop,
            "--enroll-token", data, "--data", str(npz), "--state", str(state),
            "--conditions", str(conditions),
        ],
        tmp_path / "device.log",
        state,
    )  # fmt: skip
    try:
        _wait(
            cluster,
            namespace,
            "the device selected by the job over https",
            lambda: "check-in: selected for round" in device.text(),
            [device],
            180,
        )
        assert device.identity().get("device_id")
    finally:
        stopped = device.stop() if device.proc.poll() is None else device.proc.returncode
    assert stopped == 0, device.text()[-1500:]

    # TLS taken out of the spec is taken off the gateway: plain http again, http probes.
    population["spec"] = {}
    cluster.apply(population, namespace)

    def plain_again() -> bool:
        deployment = cluster.get("deployment", f"{pop}-gateway", namespace) or {}
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        status = deployment.get("status") or {}
        try:
            answered = httpx.get(f"http://{address}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            answered = False
        return (
            answered
            and status.get("observedGeneration") == deployment["metadata"]["generation"]
            and status.get("updatedReplicas") == status.get("readyReplicas") == 1
            and not any(e["name"].startswith("FEDFLEET_TLS_") for e in container["env"])
            and container["readinessProbe"]["httpGet"].get("scheme", "HTTP") == "HTTP"
        )

    cluster.wait_for(
        plain_again, timeout=240, what="the gateway plain http again", namespace=namespace
    )
