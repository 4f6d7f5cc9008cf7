"""The cluster harness itself: a real control plane, a Ready node on containerd, and real
containers that behave like pods (IPs, probes, Services, DNS, restarts, replacement, env,
volumes, service-account tokens). The pods run the images deploy/build-images.sh built from
deploy/docker/: the services image has python, the operator image the kubernetes client."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from collections.abc import Iterator
from functools import cache
from typing import Any

import kubernetes
import pytest

from tests.cluster.conftest import Cluster
from tests.cluster.controlplane import SERVICE_CIDR
from tests.cluster.realnode import POD_CIDR, NodeImages

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]


def _ready(pod: Obj) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _live(pods: list[Obj]) -> list[Obj]:
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _phase(cluster: Cluster, ns: str, name: str) -> str:
    pod = cluster.get("pod", name, ns)
    return str(((pod or {}).get("status") or {}).get("phase", ""))


def _wait_terminal(cluster: Cluster, ns: str, name: str, timeout: float = 60) -> Obj:
    def done() -> Obj | None:
        pod = cluster.get("pod", name, ns)
        phase = ((pod or {}).get("status") or {}).get("phase")
        return pod if phase in ("Succeeded", "Failed") else None

    return cluster.wait_for(done, timeout=timeout, what=f"pod {name} to finish", namespace=ns)


@cache
def _image(role: str = "services") -> str:
    """The name deploy/build-images.sh gave the ``role`` image (imported into the node)."""
    return NodeImages.load().names[role]


def _python_pod(name: str, code: str, **spec: Any) -> Obj:
    container: Obj = {
        "name": "main",
        "image": _image(),
        "command": ["python", "-c", textwrap.dedent(code)],
    }
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


# -- control plane and node -----------------------------------------------------------------------


def test_apiserver_reports_the_built_version(cluster: Cluster) -> None:
    version = cluster.controlplane.api_get("/version")
    assert isinstance(version, dict)
    assert version["gitVersion"] == "v1.35.4"
    out = cluster.kubectl("version", "-o", "json", check=True).stdout
    assert json.loads(out)["serverVersion"]["gitVersion"] == "v1.35.4"


def test_node_is_ready_untainted_and_leased(cluster: Cluster) -> None:
    core = kubernetes.client.CoreV1Api(cluster.api_client)
    node: Any = core.read_node(cluster.node_name)
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert ready.status == "True"
    assert not [t for t in node.spec.taints or [] if t.effect in ("NoSchedule", "NoExecute")]
    assert {a.type: a.address for a in node.status.addresses}["InternalIP"] == cluster.node.node_ip
    assert node.status.node_info.kubelet_version == "v1.35.4"
    assert node.status.node_info.container_runtime_version.startswith("containerd://")
    wide = cluster.kubectl("get", "nodes", "-o", "wide", check=True).stdout.split("\n")
    row = next(line.split() for line in wide if line.startswith(cluster.node_name + " "))
    assert row[1] == "Ready" and row[-1].startswith("containerd://"), wide
    # The kubelet creates its lease once registered, then renews it every few seconds.
    lease: Any = cluster.wait_for(
        lambda: cluster.get("lease", cluster.node_name, "kube-node-lease"),
        timeout=60,
        what="the node's lease",
    )
    lease = kubernetes.client.CoordinationV1Api(cluster.api_client).read_namespaced_lease(
        cluster.node_name, "kube-node-lease"
    )
    assert lease.spec.holder_identity == cluster.node_name
    assert lease.spec.renew_time is not None


# -- a Deployment behind a Service ----------------------------------------------------------------

WEB_PORT = 8080


def _web_deployment() -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "http",
                            "image": _image(),
                            "command": ["python", "-m", "http.server", str(WEB_PORT)],
                            "args": ["--bind", "$(POD_IP)"],
                            "env": [
                                {
                                    "name": "POD_IP",
                                    "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                                }
                            ],
                            "ports": [{"name": "http", "containerPort": WEB_PORT}],
                            "readinessProbe": {
                                "httpGet": {"path": "/", "port": "http"},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def _web_service() -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def _wait_web_ready(cluster: Cluster, ns: str) -> list[Obj]:
    def two_ready() -> list[Obj] | None:
        dep = cluster.get("deployment", "web", ns) or {}
        if (dep.get("status") or {}).get("readyReplicas") != 2:
            return None
        pods = [p for p in _live(cluster.list("pods", ns, "app=web")) if _ready(p)]
        return pods if len(pods) == 2 else None

    return cluster.wait_for(two_ready, timeout=90, what="2 ready web replicas", namespace=ns)


@pytest.fixture(scope="module")
def web(cluster: Cluster) -> Iterator[str]:
    """A namespace with Deployment `web` (2 x python -m http.server) and Service `web`."""
    ns = cluster.create_namespace("web")
    try:
        cluster.apply([_web_deployment(), _web_service()], ns)
        _wait_web_ready(cluster, ns)
        yield ns
    finally:
        cluster.delete_namespace(ns)


def test_deployment_replicas_are_ready_on_distinct_pod_ips(cluster: Cluster, web: str) -> None:
    pods = _wait_web_ready(cluster, web)
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == 2, ips
    for pod in pods:
        status = pod["status"]
        assert status["phase"] == "Running"
        assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network(POD_CIDR)
        assert status["podIPs"] == [{"ip": status["podIP"]}]
        assert status["hostIP"] == cluster.node.node_ip
        assert status["startTime"]
        conds = {c["type"]: c for c in status["conditions"]}
        for ctype in ("PodScheduled", "Initialized", "ContainersReady", "Ready"):
            assert conds[ctype]["status"] == "True", conds
            assert conds[ctype]["lastTransitionTime"]
        (cs,) = status["containerStatuses"]
        assert cs["name"] == "http"
        assert cs["ready"] is True and cs["started"] is True
        assert "running" in cs["state"]
        assert cs["containerID"].startswith("containerd://")
        assert cs["image"] == _image()
        assert cs["imageID"].startswith("sha256:") or "@sha256:" in cs["imageID"], cs
        assert cs["restartCount"] == 0
        # the pod really serves on its own IP
        log = cluster.pod_log(web, pod["metadata"]["name"], "http")
        assert '"GET / HTTP/1.1" 200' in log, log


def test_service_env_points_a_client_pod_at_the_replicas(cluster: Cluster, web: str) -> None:
    code = """
        import os, urllib.request
        host, port = os.environ["WEB_SERVICE_HOST"], os.environ["WEB_SERVICE_PORT"]
        assert os.environ["WEB_SERVICE_PORT_HTTP"] == port == "80", os.environ
        assert os.environ["WEB_PORT"] == f"tcp://{host}:{port}", os.environ["WEB_PORT"]
        for url in (f"http://{host}:{port}/", "http://web/", "http://web.%s.svc.cluster.local/"
                    % open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()):
            for _ in range(4):  # round-robin over both replicas
                with urllib.request.urlopen(url, timeout=5) as resp:
                    assert resp.status == 200, resp.status
        print("OK", host, port)
    """
    cluster.apply(_python_pod("client", code), web)
    pod = _wait_terminal(cluster, web, "client")
    log = cluster.pod_log(web, "client")
    assert pod["status"]["phase"] == "Succeeded", log
    (cs,) = pod["status"]["containerStatuses"]
    assert cs["state"]["terminated"]["exitCode"] == 0
    assert cs["state"]["terminated"]["reason"] == "Completed"
    host = log.split("OK ", 1)[1].split()[0]
    assert ipaddress.ip_address(host) in ipaddress.ip_network(SERVICE_CIDR), log
    # both replicas served some of the requests
    for p in _live(cluster.list("pods", web, "app=web")):
        assert "GET / HTTP/1.1" in cluster.pod_log(web, p["metadata"]["name"])


def test_deleted_pod_is_replaced_by_the_replicaset(cluster: Cluster, web: str) -> None:
    before = _wait_web_ready(cluster, web)
    victim = before[0]["metadata"]["name"]
    cluster.kubectl("delete", "pod", victim, "-n", web, "--wait=true", check=True, timeout=60)
    assert cluster.get("pod", victim, web) is None

    def replaced() -> list[Obj] | None:
        pods = [p for p in _live(cluster.list("pods", web, "app=web")) if _ready(p)]
        names = {p["metadata"]["name"] for p in pods}
        return pods if len(pods) == 2 and victim not in names else None

    after = cluster.wait_for(replaced, timeout=60, what="a replacement replica", namespace=web)
    assert len({p["status"]["podIP"] for p in after}) == 2


# -- restarts ---------------------------------------------------------------------------------


def test_failing_liveness_probe_restarts_the_container(cluster: Cluster, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "unhealthy"},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "http",
                    "image": _image(),
                    "command": ["python", "-m", "http.server", "8080", "--bind", "$(POD_IP)"],
                    "env": [
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                    ],
                    "livenessProbe": {
                        "httpGet": {"path": "/no-such-page", "port": 8080},
                        "initialDelaySeconds": 1,
                        "periodSeconds": 1,
                        "failureThreshold": 2,
                    },
                }
            ],
        },
    }
    cluster.apply(pod, namespace)

    def restarted() -> Obj | None:
        p = cluster.get("pod", "unhealthy", namespace) or {}
        statuses = (p.get("status") or {}).get("containerStatuses") or []
        return statuses[0] if statuses and statuses[0]["restartCount"] >= 1 else None

    cs = cluster.wait_for(restarted, timeout=90, what="a liveness restart", namespace=namespace)
    last = cs["lastState"]["terminated"]
    assert last["exitCode"] != 0, last  # ended by the kubelet's signal, not by itself
    log = cluster.pod_log(namespace, "unhealthy", previous=True)
    assert '"GET /no-such-page HTTP/1.1" 404' in log, log
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json", check=True).stdout
    items = json.loads(events)["items"]
    assert {"Unhealthy", "Killing", "Started"} <= {e["reason"] for e in items}, items
    killing = [e["message"] for e in items if e["reason"] == "Killing"]
    assert any("failed liveness probe" in m for m in killing), killing


# -- env, volumes, identity -----------------------------------------------------------------------


def test_env_sources_expansion_volumes_and_security_context(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "cfg"},
                "data": {"greeting": "hello", "app.yaml": "a: 1\n"},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "sec"},
                "stringData": {"password": "s3cret"},
            },
        ],
        namespace,
    )
    code = """
        import json, os, sys
        out = {k: os.environ.get(k) for k in
               ["GREETING", "PASSWORD", "MISSING", "COMBINED", "ESCAPED", "UNKNOWN", "UID",
                "NODE", "SA", "NAME", "HOSTNAME"]}
        out["argv"] = sys.argv[1:]
        out["cwd"] = os.getcwd()
        out["uid"], out["gid"] = os.getuid(), os.getgid()
        out["config"] = open("/etc/fedfleet-test/config/app.yaml").read()
        out["secret"] = open("/etc/fedfleet-test/secret/password").read()
        try:
            open("/etc/fedfleet-test/config/new", "w")
            out["config_ro"] = False
        except OSError:
            out["config_ro"] = True
        with open("written.txt", "w") as fh:  # cwd is the emptyDir, writable as uid 65534
            fh.write("x")
        try:  # readOnlyRootFilesystem: /tmp (part of /) is read-only, the volumes are not
            open("/tmp/fedfleet-ro-check", "w")
            out["root_ro"] = False
        except OSError:
            out["root_ro"] = True
        out["scratch"] = sorted(os.listdir("/scratch"))
        print("RESULT " + json.dumps(out))
    """
    pod = _python_pod(
        "envcheck",
        code,
        securityContext={"runAsUser": 65534, "runAsGroup": 65534, "runAsNonRoot": True},
        volumes=[
            {"name": "config", "configMap": {"name": "cfg"}},
            {"name": "secret", "secret": {"secretName": "sec"}},
            {"name": "scratch", "emptyDir": {}},
        ],
        container={
            "args": ["$(GREETING)", "$$(GREETING)", "$(UNKNOWN)"],
            "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
            "workingDir": "/scratch",
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/fedfleet-test/config", "readOnly": True},
                {"name": "secret", "mountPath": "/etc/fedfleet-test/secret", "readOnly": True},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
            "env": [
                {
                    "name": "GREETING",
                    "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}},
                },
                {
                    "name": "PASSWORD",
                    "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}},
                },
                {
                    "name": "MISSING",
                    "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}},
                },
                {"name": "COMBINED", "value": "$(GREETING)-$(PASSWORD)"},
                {"name": "ESCAPED", "value": "$$(GREETING)"},
                {"name": "UNKNOWN", "value": "$(NOT_DEFINED)"},
                {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {
                    "name": "SA",
                    "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}},
                },
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
        },
    )
    cluster.apply(pod, namespace)
    status = _wait_terminal(cluster, namespace, "envcheck")
    log = cluster.pod_log(namespace, "envcheck")
    assert status["status"]["phase"] == "Succeeded", log
    line = next(ln for ln in log.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["GREETING"] == "hello"
    assert out["PASSWORD"] == "s3cret"
    assert out["MISSING"] is None
    assert out["COMBINED"] == "hello-s3cret"
    assert out["ESCAPED"] == "$(GREETING)"
    assert out["UNKNOWN"] == "$(NOT_DEFINED)"
    assert out["UID"] == status["metadata"]["uid"]
    assert out["NODE"] == cluster.node_name
    assert out["SA"] == "default"
    assert out["NAME"] == out["HOSTNAME"] == "envcheck"
    assert out["argv"] == ["hello", "$(GREETING)", "$(NOT_DEFINED)"]
    assert out["cwd"] == "/scratch"
    assert (out["uid"], out["gid"]) == (65534, 65534)
    assert out["config"] == "a: 1\n"
    assert out["secret"] == "s3cret"
    assert out["config_ro"] is True
    assert out["scratch"] == ["written.txt"]
    assert out["root_ro"] is True


def test_missing_config_missing_image_and_the_images_own_entrypoint(
    cluster: Cluster, namespace: str
) -> None:
    """A missing ConfigMap holds the container in CreateContainerConfigError; an image the
    node does not have, with pull policy Never, in ErrImageNeverPull (nothing is pulled); a
    container with no command runs its image's ENTRYPOINT and CMD (`fedfleet --help`)."""
    cluster.apply(
        [
            _python_pod(
                "needs-config",
                "print(1)",
                container={
                    "env": [
                        {
                            "name": "X",
                            "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}},
                        }
                    ]
                },
            ),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "no-image"},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.example/absent:1.0",
                            "imagePullPolicy": "Never",
                        }
                    ]
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "entrypoint"},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": _image()}],
                },
            },
        ],
        namespace,
    )

    def waiting_reason(name: str) -> str | None:
        pod = cluster.get("pod", name, namespace) or {}
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        waiting = (statuses[0]["state"].get("waiting") or {}) if statuses else {}
        return waiting.get("reason") if waiting.get("reason") != "ContainerCreating" else None

    reason = cluster.wait_for(
        lambda: waiting_reason("needs-config"), timeout=60, what="config error", namespace=namespace
    )
    assert reason == "CreateContainerConfigError"
    assert _phase(cluster, namespace, "needs-config") == "Pending"
    reason = cluster.wait_for(
        lambda: waiting_reason("no-image"), timeout=60, what="image error", namespace=namespace
    )
    assert reason == "ErrImageNeverPull"
    assert _phase(cluster, namespace, "no-image") == "Pending"

    done = _wait_terminal(cluster, namespace, "entrypoint")
    log = cluster.pod_log(namespace, "entrypoint")
    assert done["status"]["phase"] == "Succeeded", log
    assert "usage: fedfleet" in log, log


# -- service-account tokens and RBAC -----------------------------------------------------------

_LIST_PODS = """
    import os, sys
    from kubernetes import client, config
    config.load_incluster_config()
    ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
    try:
        pods = client.CoreV1Api().list_namespaced_pod(ns)
        print("LISTED", len(pods.items))
        status = 200
    except client.ApiException as exc:
        print("STATUS", exc.status, exc.reason)
        status = exc.status
    sys.exit(0 if str(status) == os.environ["EXPECT"] else 1)
"""


def test_service_account_token_works_in_cluster_under_rbac(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "stranger"}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "pod-reader"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "pod-reader",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "reader"}],
            },
        ],
        namespace,
    )
    nonroot = {"runAsUser": 65534, "runAsNonRoot": True}
    cluster.apply(
        [
            _python_pod(
                "allowed",
                _LIST_PODS,
                serviceAccountName="reader",
                securityContext=nonroot,
                # the operator image has the kubernetes client
                container={
                    "image": _image("operator"),
                    "env": [{"name": "EXPECT", "value": "200"}],
                },
            ),
            _python_pod(
                "forbidden",
                _LIST_PODS,
                serviceAccountName="stranger",
                securityContext=nonroot,
                container={
                    "image": _image("operator"),
                    "env": [{"name": "EXPECT", "value": "403"}],
                },
            ),
            _python_pod(
                "no-token",
                "import os; assert not os.path.exists("
                "'/var/run/secrets/kubernetes.io/serviceaccount/token'); print('NO TOKEN')",
                automountServiceAccountToken=False,
            ),
        ],
        namespace,
    )
    for name, marker in (("allowed", "LISTED"), ("forbidden", "STATUS 403"), ("no-token", "NO")):
        pod = _wait_terminal(cluster, namespace, name)
        log = cluster.pod_log(namespace, name)
        assert pod["status"]["phase"] == "Succeeded", f"{name}: {log}"
        assert marker in log, f"{name}: {log}"


def test_kubectl_logs_reaches_the_kubelet(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_python_pod("talker", "print('line one'); print('line two')"), namespace)
    _wait_terminal(cluster, namespace, "talker")
    out = cluster.kubectl("logs", "talker", "-n", namespace, check=True).stdout
    assert out == "line one\nline two\n"
    tail = cluster.kubectl("logs", "talker", "-n", namespace, "--tail=1", check=True).stdout
    assert tail == "line two\n"


def test_init_container_and_startup_tcp_exec_probes(cluster: Cluster, namespace: str) -> None:
    """The init container writes into an emptyDir the main container serves from; a tcpSocket
    startup probe gates an exec readiness probe that runs inside the container's mounts."""
    serve = """
        import os, time, http.server, socketserver
        assert open("/data/seed.txt").read() == "seeded\\n"
        time.sleep(1)
        open("/data/ready", "w").close()
        os.chdir("/data")
        handler = http.server.SimpleHTTPRequestHandler
        with socketserver.TCPServer((os.environ["POD_IP"], 9000), handler) as srv:
            srv.serve_forever()
    """
    pod = _python_pod(
        "probed",
        serve,
        restartPolicy="Always",
        # python is the container's pid 1, which ignores SIGTERM: end the grace period soon
        terminationGracePeriodSeconds=2,
        volumes=[{"name": "work", "emptyDir": {}}],
        initContainers=[
            {
                "name": "seed",
                "image": _image(),
                "command": ["sh", "-c", "echo seeded > /data/seed.txt"],
                "volumeMounts": [{"name": "work", "mountPath": "/data"}],
            }
        ],
        container={
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "volumeMounts": [{"name": "work", "mountPath": "/data"}],
            "startupProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 1},
            "readinessProbe": {
                "exec": {"command": ["test", "-f", "/data/ready"]},
                "periodSeconds": 1,
            },
        },
    )
    cluster.apply(pod, namespace)

    def ready() -> Obj | None:
        p = cluster.get("pod", "probed", namespace) or {}
        return p if _ready(p) else None

    p = cluster.wait_for(ready, timeout=60, what="probed pod ready", namespace=namespace)
    (init,) = p["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0
    conds = {c["type"]: c["status"] for c in p["status"]["conditions"]}
    assert conds["Initialized"] == "True"
    assert not __import__("os").path.exists("/data/ready")  # the emptyDir is not the host's /work

    # graceful deletion ends in a terminal phase, then the object goes away
    cluster.kubectl("delete", "pod", "probed", "-n", namespace, "--wait=true", check=True)
    assert cluster.get("pod", "probed", namespace) is None


def test_container_over_its_memory_limit_is_oom_killed_and_restarted(
    cluster: Cluster, namespace: str
) -> None:
    """A 64 MiB limit enforced by the runtime's cgroup: a container that touches 256 MB is
    killed by the kernel (OOMKilled, exit 137) and the kubelet restarts it in the same pod."""
    pod = _python_pod(
        "hungry",
        """
        import time
        print("allocating", flush=True)
        data = b"x" * (256 << 20)  # every page touched
        print("survived", len(data), flush=True)
        time.sleep(3600)
        """,
        restartPolicy="Always",
        terminationGracePeriodSeconds=2,
        container={"resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}},
    )
    cluster.apply(pod, namespace)

    def oom_restarted() -> Obj | None:
        p = cluster.get("pod", "hungry", namespace) or {}
        statuses = (p.get("status") or {}).get("containerStatuses") or []
        cs = statuses[0] if statuses else {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        return cs if cs.get("restartCount", 0) >= 1 and last else None

    cs = cluster.wait_for(oom_restarted, timeout=120, what="an OOM kill", namespace=namespace)
    last = cs["lastState"]["terminated"]
    assert (last["reason"], last["exitCode"]) == ("OOMKilled", 137), last
    # (Its log is not asserted: the restarted container is OOM-killed again at once, and the
    # kubelet keeps only the latest dead container's log, so `--previous` races the restarts.)
