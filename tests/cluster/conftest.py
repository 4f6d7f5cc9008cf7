"""Fixtures of the cluster tier: a real Kubernetes control plane + a real node, per session.

``cluster`` (session) reads the binaries and images the setup step built
(deploy/build-binaries.sh, deploy/build-node.sh and deploy/build-images.sh, run by
``bash deploy/dev.sh setup``; anything missing FAILS the test with that command, never skips),
starts a ``ControlPlane`` advertising the host's address and a ``RealNode`` (node ``node-0``:
containerd + runc, the bridge CNI, a kubelet, kube-proxy and CoreDNS; tests/cluster/realnode.py)
and yields a ``Cluster``. Pods are real containers from the images deploy/docker/ builds
(``cluster.image("services")``, ``"operator"``, ``"redis"``); pod IPs (10.88.0.0/24) and
Service ClusterIPs (controlplane.SERVICE_CIDR, through kube-proxy) are reachable from this host:

    def test_x(cluster, namespace):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=True)
        cluster.helm("install", "rel", "charts/fedfleet", "-n", namespace, check=True)
        core = kubernetes.client.CoreV1Api(cluster.api_client)
        pod = cluster.wait_for(lambda: ..., timeout=60, what="pod ready", namespace=namespace)
        print(cluster.pod_log(namespace, "pod-name"))        # or `kubectl logs`

``namespace`` (function) is a fresh namespace whose `default` ServiceAccount exists; it is
deleted afterwards without waiting. Set FEDFLEET_KEEP_CLUSTER=1 to keep the cluster's and the
node's directories (logs, etcd data, containerd's state) after the run; their paths are
printed. The node changes host-global state (sysctls, iptables, a bridge, cgroups): it is put
back when the session ends, and a killed run's leftovers are put back by the next run (or by
``python -m tests.cluster.realnode --cleanup``).

Mark cluster tests with ``pytestmark = pytest.mark.cluster``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.cluster.controlplane import Binaries, ControlPlane, ControlPlaneError, load_binaries
from tests.cluster.hoststate import HostStateError
from tests.cluster.realnode import RealNode, RealNodeError, host_ip

T = TypeVar("T")

NODE_NAME = "node-0"


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated here so the tier runs under --strict-markers
    # on its own.
    config.addinivalue_line("markers", "cluster: needs the real Kubernetes test cluster")


@dataclass
class Cluster:
    """A running control plane + real node and handy ways to talk to it."""

    controlplane: ControlPlane
    node: RealNode
    binaries: Binaries
    api_client: Any  # kubernetes.client.ApiClient (admin)
    startup_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.controlplane.kubeconfig

    @property
    def server(self) -> str:
        return self.controlplane.server

    @property
    def node_name(self) -> str:
        return self.node.name

    def image(self, role: str) -> str:
        """The name of the image deploy/build-images.sh built for ``role`` (services,
        operator, redis, pause), imported into the node's containerd."""
        return self.node.images.names[role]

    def kubectl(
        self, *args: str, check: bool = False, input: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return self.controlplane.kubectl(*args, check=check, input=input, timeout=timeout)

    def helm(
        self, *args: str, check: bool = False, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """The cached helm binary with this cluster's kubeconfig (helm's own state in the
        cluster's directory, not in ~)."""
        home = self.controlplane.workdir / "helm"
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            HELM_CACHE_HOME=str(home / "cache"),
            HELM_CONFIG_HOME=str(home / "config"),
            HELM_DATA_HOME=str(home / "data"),
        )
        proc = subprocess.run(
            [self.binaries.helm, f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def apply(self, manifest: str | dict[str, Any] | list[dict[str, Any]], namespace: str) -> None:
        """kubectl apply a YAML string or object(s) (JSON is YAML) into ``namespace``."""
        if isinstance(manifest, list):
            text = json.dumps({"apiVersion": "v1", "kind": "List", "items": manifest})
        elif isinstance(manifest, dict):
            text = json.dumps(manifest)
        else:
            text = manifest
        self.kubectl("apply", "-n", namespace, "-f", "-", input=text, check=True)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """One object as a dict (kubectl get -o json), None if it does not exist."""
        args = ["get", kind, name, "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        proc = self.kubectl(*args)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
        obj: dict[str, Any] = json.loads(proc.stdout)
        return obj

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-n", namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        items: list[dict[str, Any]] = json.loads(self.kubectl(*args, check=True).stdout)["items"]
        return items

    def pod_log(
        self,
        namespace: str,
        name: str,
        container: str | None = None,
        previous: bool = False,
        tail: int | None = None,
    ) -> str:
        """`kubectl logs` (through the apiserver and the kubelet); "" when there is none."""
        args = ["logs", name, "-n", namespace]
        if container:
            args += ["-c", container]
        if previous:
            args.append("--previous")
        if tail is not None:
            args.append(f"--tail={tail}")
        proc = self.kubectl(*args)
        return proc.stdout if proc.returncode == 0 else ""

    def diagnostics(self, namespace: str | None = None) -> str:
        """What to print when something does not converge."""
        parts: list[str] = []
        scope = ["-n", namespace] if namespace else ["-A"]
        for args in (
            ["get", "all,events", *scope, "-o", "wide"],
            ["get", "pods", *scope, "-o", "yaml"],
        ):
            proc = self.kubectl(*args)
            text = proc.stdout[-12000:] if proc.returncode == 0 else proc.stderr
            parts.append(f"$ kubectl {' '.join(args)}\n{text}")
        if namespace:
            pods = self.kubectl("get", "pods", "-n", namespace, "-o", "json")
            items = json.loads(pods.stdout)["items"] if pods.returncode == 0 else []
            for pod in items:
                pod_name = pod["metadata"]["name"]
                for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
                    log = self.pod_log(namespace, pod_name, c["name"], tail=15)
                    parts.append(f"--- log of pod {pod_name} container {c['name']}\n{log}")
        for name in ("kubelet", "containerd", "kube-proxy"):
            parts.append(f"--- {name}\n{self.node.log_tail(name, 25)}")
        for name in ControlPlane.COMPONENTS:
            if name != "etcd":
                parts.append(f"--- {name}\n{self.controlplane.log_tail(name, 15)}")
        return "\n".join(parts)

    def wait_for(
        self,
        probe: Callable[[], T | None],
        *,
        timeout: float = 60.0,
        interval: float = 0.5,
        what: str = "condition",
        namespace: str | None = None,
    ) -> T:
        """Poll ``probe`` until it returns something truthy; fail with diagnostics otherwise."""
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        while True:
            try:
                value = probe()
                if value:
                    return value
            except AssertionError as exc:
                last_exc = exc
            if time.monotonic() > deadline:
                detail = f" (last error: {last_exc})" if last_exc else ""
                pytest.fail(
                    f"timed out after {timeout:g} s waiting for {what}{detail}\n"
                    f"{self.diagnostics(namespace)}"
                )
            time.sleep(interval)

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix[:40].rstrip('-')}-{secrets.token_hex(3)}".lower()
        self.kubectl("create", "namespace", name, check=True)
        self.wait_for(
            lambda: self.get("serviceaccount", "default", name) is not None,
            timeout=30,
            interval=0.1,
            what=f"default ServiceAccount in {name}",
        )
        return name

    def delete_namespace(self, name: str) -> None:
        self.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


def _sanitize(nodeid: str) -> str:
    base = nodeid.rsplit("::", 1)[-1].split("[", 1)[0]
    return "".join(ch if ch.isalnum() else "-" for ch in base.lower()).strip("-")[:30] or "t"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    t0 = time.monotonic()
    try:
        binaries = load_binaries()
    except ControlPlaneError as exc:
        pytest.fail(f"the test cluster's binaries are missing: {exc}", pytrace=False)
    t_bin = time.monotonic() - t0
    try:
        import kubernetes
    except ImportError as exc:  # a dev dependency: fail loudly, never skip
        pytest.fail(f"the python kubernetes client is not installed: {exc}", pytrace=False)

    try:
        address = host_ip()
    except (RealNodeError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"no host address for the real node: {exc}", pytrace=False)
    controlplane = ControlPlane(binaries, advertise_address=address)
    try:
        controlplane.start()
    except ControlPlaneError as exc:
        pytest.fail(f"control plane did not start: {exc}", pytrace=False)
    try:
        # nice 0: the node's containers are the system under test, not a neighbour to spare.
        node = RealNode(controlplane, name=NODE_NAME, nice=0, lock_timeout=600).start()
    except (RealNodeError, HostStateError) as exc:  # images missing, another node runs, ...
        controlplane.stop()
        pytest.fail(f"the real node did not start: {exc}", pytrace=False)
    except BaseException:
        controlplane.stop()
        raise
    api_client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(controlplane.kubeconfig)
    )
    timings = {
        "binaries": t_bin,
        **{f"controlplane_{k}": v for k, v in controlplane.startup_seconds.items()},
        **{f"node_{k}": v for k, v in node.startup_seconds.items()},
        "total": time.monotonic() - t0,
    }
    print(f"\ncluster up: {json.dumps({k: round(v, 2) for k, v in timings.items()})}")
    try:
        yield Cluster(controlplane, node, binaries, api_client, timings)
    finally:
        api_client.close()
        try:
            node.stop()
        finally:
            controlplane.stop()
        if controlplane.keep:
            print(f"\nkept cluster directory {controlplane.workdir} and node {node.workdir}")
        if node.host_diff:  # an error of the session's last test, never silent
            pytest.fail(
                "the real node left host state changed (repair: python -m "
                f"tests.cluster.realnode --cleanup): {node.host_diff}",
                pytrace=False,
            )


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (default ServiceAccount present), deleted afterwards without waiting."""
    name = cluster.create_namespace(_sanitize(request.node.nodeid))
    try:
        yield name
    finally:
        cluster.delete_namespace(name)
