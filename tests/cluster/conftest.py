"""Fixtures of the cluster tier: a real Kubernetes control plane + the node agent, per session.

``cluster`` (session) reads the binaries the setup step built (deploy/build-binaries.sh, run
by ``bash deploy/dev.sh setup``; missing binaries FAIL the test with that command, never skip),
starts a ``ControlPlane`` and a ``NodeAgent`` (node ``node-0``) and yields a ``Cluster``:

    def test_x(cluster, namespace):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest, check=True)
        cluster.helm("install", "rel", "charts/fedfleet", "-n", namespace, check=True)
        core = kubernetes.client.CoreV1Api(cluster.api_client)
        pod = cluster.wait_for(lambda: ..., timeout=60, what="pod ready", namespace=namespace)
        print(cluster.pod_log(namespace, "pod-name"))        # or `kubectl logs`

``namespace`` (function) is a fresh namespace whose `default` ServiceAccount exists; it is
deleted afterwards without waiting. Set FEDFLEET_KEEP_CLUSTER=1 to keep the cluster's and the
agent's directories (logs, etcd data, pod logs) after the run; their paths are printed.

Mark cluster tests with ``pytestmark = pytest.mark.cluster``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.cluster.controlplane import Binaries, ControlPlane, ControlPlaneError, load_binaries
from tests.cluster.nodeagent import NodeAgent, NodeAgentError

T = TypeVar("T")

NODE_NAME = "node-0"


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated here so the tier runs under --strict-markers
    # on its own.
    config.addinivalue_line("markers", "cluster: needs the real Kubernetes test cluster")


@dataclass
class Cluster:
    """A running control plane + node agent and handy ways to talk to it."""

    controlplane: ControlPlane
    agent: NodeAgent
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
        return self.agent.node_name

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

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        return self.agent.pod_log(namespace, name, container)

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
            for pod_dir in sorted(self.agent.logs_dir.glob(f"{namespace}_*")):
                for cdir in sorted(p for p in pod_dir.iterdir() if p.is_dir()):
                    files = sorted(cdir.glob("*.log"), key=lambda f: int(f.stem))
                    tail = files[-1].read_text(errors="replace").splitlines()[-15:] if files else []
                    name = pod_dir.name.rsplit("_", 1)[0].split("_", 1)[1]
                    parts.append(
                        f"--- log of pod {name} container {cdir.name} (restart "
                        f"{files[-1].stem if files else '-'})\n" + "\n".join(tail)
                    )
        parts.append(self.agent.log_tail(40))
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

    controlplane = ControlPlane(binaries)
    try:
        controlplane.start()
    except ControlPlaneError as exc:
        pytest.fail(f"control plane did not start: {exc}", pytrace=False)
    agent = NodeAgent(
        controlplane.kubeconfig,
        node_name=NODE_NAME,
        state_dir=controlplane.workdir / "agent",
        tls_cert=controlplane.kubelet_cert,
        tls_key=controlplane.kubelet_key,
        python=sys.executable,
    )
    try:
        agent.start()
    except NodeAgentError as exc:
        controlplane.stop()
        pytest.fail(f"node agent did not start: {exc}", pytrace=False)
    api_client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(controlplane.kubeconfig)
    )
    timings = {
        "binaries": t_bin,
        **{f"controlplane_{k}": v for k, v in controlplane.startup_seconds.items()},
        "agent": agent.startup_seconds,
        "total": time.monotonic() - t0,
    }
    print(f"\ncluster up: {json.dumps({k: round(v, 2) for k, v in timings.items()})}")
    try:
        yield Cluster(controlplane, agent, binaries, api_client, timings)
    finally:
        api_client.close()
        agent.stop()
        controlplane.stop()
        if controlplane.keep:
            print(f"\nkept cluster directory {controlplane.workdir}")


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (default ServiceAccount present), deleted afterwards without waiting."""
    name = cluster.create_namespace(_sanitize(request.node.nodeid))
    try:
        yield name
    finally:
        cluster.delete_namespace(name)
