"""The Helm chart, rendered by the real helm binary, against operator/CONTRACT.md.

helm comes from ``deploy/build-binaries.sh`` (a cached build of a pinned release, made by the
setup step of ``bash deploy/dev.sh test`` before pytest starts). If it is missing these tests
fail with the reason: a chart nobody rendered is not a tested chart. Every render pins
``--kube-version``, so the checks do not depend on a cluster. Rendered objects are parsed and
compared as data: RBAC rules as sets of (group, resource, verb), pod hardening per container, the
operator's environment per the contract, and the two Redis modes (bundled, external).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.binaries import BinariesMissing, read_binaries_env

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fedfleet"
CONTRACT = REPO / "operator" / "CONTRACT.md"
KUBE_VERSION = "1.35.4"
RELEASE, NAMESPACE = "rel", "fedfleet"

Obj = dict[str, Any]

# operator/CONTRACT.md, "RBAC": also parsed from the contract below; both must agree.
CONTRACT_RBAC: frozenset[tuple[str, str, str]] = frozenset(
    {("fedfleet.dev", "fljobs", v) for v in ("get", "list", "watch", "patch", "delete")}
    | {("fedfleet.dev", "fljobs/status", v) for v in ("get", "patch")}
    | {("fedfleet.dev", "flpopulations", v) for v in ("get", "list", "watch", "patch")}
    | {("fedfleet.dev", "flpopulations/status", v) for v in ("get", "patch")}
    | {
        ("", r, v)
        for r in ("configmaps", "secrets", "services")
        for v in ("get", "list", "watch", "create", "patch", "delete")
    }
    | {("", "pods", "patch")}  # only the pod-deletion cost of a drained aggregator
    | {("apps", "deployments", v) for v in ("get", "list", "watch", "create", "patch", "delete")}
    | {("", "events", "create"), ("events.k8s.io", "events", "create")}
    | {("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    | {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}
    | {("", "namespaces", v) for v in ("get", "list", "watch")}
)


# --- helm ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Helm:
    """The helm binary and an environment that keeps it away from the user's files."""

    binary: str
    home: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": f"{self.home}/cache",
            "HELM_CONFIG_HOME": f"{self.home}/config",
            "HELM_DATA_HOME": f"{self.home}/data",
            "KUBECONFIG": f"{self.home}/no-kubeconfig",  # never talk to a real cluster
        }
        return subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=60, check=False, env=env
        )


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    try:
        binary = read_binaries_env()["FEDFLEET_HELM"]
    except BinariesMissing as exc:
        pytest.fail(f"cannot test the chart: {exc}", pytrace=False)
    return Helm(binary, str(tmp_path_factory.mktemp("helm-home")))


def _run(helm: Helm, *args: str) -> subprocess.CompletedProcess[str]:
    return helm.run(*args)


@functools.cache
def _template_cached(helm: Helm, args: tuple[str, ...]) -> tuple[Obj, ...]:
    proc = _run(
        helm,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        *args,
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(helm: Helm, *args: str) -> list[Obj]:
    return [json.loads(json.dumps(d)) for d in _template_cached(helm, args)]  # fresh copies


def _one(objs: list[Obj], kind: str, component: str | None = None) -> Obj:
    found = [
        o for o in objs if o["kind"] == kind and (component is None or _component(o) == component)
    ]
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def _component(obj: Obj) -> str | None:
    labels: dict[str, str] = obj["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/component")


def _kinds(objs: list[Obj]) -> list[tuple[str, str | None]]:
    return sorted((o["kind"], _component(o)) for o in objs)


def _pod_specs(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Pod":
            yield name, obj["spec"]
        elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield name, obj["spec"]["template"]["spec"]


def _env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def _operator(objs: list[Obj]) -> Obj:
    deployment = _one(objs, "Deployment", "operator")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    container_obj: Obj = container
    return container_obj


# --- lint ----------------------------------------------------------------------------------

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


@pytest.mark.parametrize(
    "values", [None, *CI_VALUES], ids=["defaults", *[p.stem for p in CI_VALUES]]
)
def test_helm_lint_strict(helm: Helm, values: Path | None) -> None:
    extra = ["-f", str(values)] if values else []
    proc = _run(helm, "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_ci_scenarios_exist() -> None:
    assert {p.name for p in CI_VALUES} >= {"bundled-values.yaml", "external-redis-values.yaml"}


def test_chart_metadata(helm: Helm) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert (chart["apiVersion"], chart["name"], chart["appVersion"]) == ("v2", "fedfleet", "0.1.0")
    assert chart["kubeVersion"] == ">=1.29.0-0"
    proc = _run(helm, "template", RELEASE, str(CHART), "--kube-version", "1.28.9")
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


# --- CRDs ----------------------------------------------------------------------------------


def test_chart_crds_are_identical_copies() -> None:
    top = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert set(top) == {"fljob.yaml", "flpopulation.yaml", "kopf-peering.yaml"}
    assert set(chart) == set(top), "charts/fedfleet/crds/ must hold exactly crds/*.yaml"
    for name in top:
        assert chart[name] == top[name], (
            f"charts/fedfleet/crds/{name} differs from crds/{name}; copy it"
        )


# --- RBAC ----------------------------------------------------------------------------------


def _contract_rbac() -> set[tuple[str, str, str]]:
    """Parse the RBAC paragraph of CONTRACT.md: `group `res`, `res`: verbs; ...`."""
    text = CONTRACT.read_text(encoding="utf-8")
    section = text.split("## RBAC", 1)[1].split("\n## ", 1)[0]
    body = " ".join(section.split("\n", 1)[1].split()).split("Nothing else")[0]
    aliases = {"core": "", "apiextensions": "apiextensions.k8s.io"}
    out: set[tuple[str, str, str]] = set()
    group = ""
    for segment in body.split(";"):
        subjects, _, verbs = segment.rpartition(":")
        resources: list[tuple[str, str]] = []
        for quoted, word in re.findall(r"`([^`]+)`|([A-Za-z0-9.-]+)", subjects):
            if quoted:
                resources.append((group, quoted))
            elif word != "and":
                group = aliases.get(word, word)
        for verb in verbs.strip(" .").split():
            out |= {(g, r, verb) for g, r in resources}
    return out


def _rule_triples(role: Obj) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no names, no URLs
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                out |= {(g, r, v) for v in rule["verbs"]}
    return out


def test_contract_rbac_paragraph_parses_to_the_expected_rules() -> None:
    assert _contract_rbac() == set(CONTRACT_RBAC)


def test_cluster_role_has_exactly_the_contract_rules(helm: Helm) -> None:
    objs = render(helm)
    role = _one(objs, "ClusterRole")
    assert _rule_triples(role) == set(CONTRACT_RBAC)
    assert not any("*" in str(rule) for rule in role["rules"])
    binding = _one(objs, "ClusterRoleBinding")
    account = _one(objs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    pod = _one(objs, "Deployment", "operator")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert not any(o["kind"] in ("Role", "RoleBinding") for o in objs)


# --- pods ----------------------------------------------------------------------------------

SCENARIOS = [
    [],
    ["-f", str(CHART / "ci" / "bundled-values.yaml")],
    ["-f", str(CHART / "ci" / "external-redis-values.yaml")],
    ["--set", "redis.bindPodIP=true,redis.auth.existingSecret=mine"],
]


@pytest.mark.parametrize("args", SCENARIOS, ids=["defaults", "bundled", "external", "bind"])
def test_every_pod_is_non_root_and_read_only(helm: Helm, args: list[str]) -> None:
    pods = list(_pod_specs(render(helm, *args)))
    assert pods
    for name, pod in pods:
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True, name
        assert pod_ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        for container in pod["containers"] + pod.get("initContainers", []):
            ctx = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 0)) > 0, where
            assert "privileged" not in ctx or ctx["privileged"] is False, where


@pytest.mark.parametrize("args", SCENARIOS, ids=["defaults", "bundled", "external", "bind"])
def test_selectors_match_their_pods(helm: Helm, args: list[str]) -> None:
    objs = render(helm, *args)
    pods = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    for obj in pods:
        selector = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), obj["metadata"]["name"]
    for svc in (o for o in objs if o["kind"] == "Service"):
        matched = [
            o
            for o in pods
            if svc["spec"]["selector"].items()
            <= o["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matched) == 1, svc["metadata"]["name"]


def test_operator_deployment_follows_the_contract(helm: Helm) -> None:
    objs = render(helm)
    deployment = _one(objs, "Deployment", "operator")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is True
    container = _operator(objs)
    assert container["command"] == ["fedfleet", "operator"]
    assert container["image"] == "fedfleet/operator:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    env = _env(container)
    assert {
        "FEDFLEET_STORE_URL",
        "FEDFLEET_REDIS_PASSWORD",
        "FEDFLEET_ACTOR_IMAGE_PULL_POLICY",
        "FEDFLEET_NAMESPACES",
        "FEDFLEET_PEERING",
        "FEDFLEET_STATUS_INTERVAL",
        "FEDFLEET_ACTOR_TICK_SECONDS",
        "FEDFLEET_LEASE_TTL",
        "POD_NAME",
    } <= set(env)
    assert "FEDFLEET_ACTOR_IMAGE" not in env  # unset: each job's spec.actors.image
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    values = {name: e.get("value") for name, e in env.items()}
    assert values["FEDFLEET_PEERING"] == "fedfleet"
    assert values["FEDFLEET_NAMESPACES"] == ""
    assert values["FEDFLEET_ACTOR_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert (values["FEDFLEET_STATUS_INTERVAL"], values["FEDFLEET_LEASE_TTL"]) == ("5", "10")
    assert values["FEDFLEET_ACTOR_TICK_SECONDS"] == "0.5"
    peering = _one(objs, "ClusterKopfPeering")
    assert (peering["apiVersion"], peering["metadata"]["name"]) == ("kopf.dev/v1", "fedfleet")


def test_operator_settings_come_from_values(helm: Helm) -> None:
    objs = render(
        helm,
        "--set",
        "actors.image=reg/svc:1,operator.watchNamespaces={a,b},replicaCount=3",
        "--set",
        "operator.peering.name=other,operator.peering.create=false,operator.leaseTTL=7.5",
    )
    env = {n: e.get("value") for n, e in _env(_operator(objs)).items()}
    assert env["FEDFLEET_ACTOR_IMAGE"] == "reg/svc:1"
    assert env["FEDFLEET_NAMESPACES"] == "a,b"
    assert env["FEDFLEET_PEERING"] == "other"
    assert env["FEDFLEET_LEASE_TTL"] == "7.5"
    assert _one(objs, "Deployment", "operator")["spec"]["replicas"] == 3
    assert not any(o["kind"] == "ClusterKopfPeering" for o in objs)


def test_bundled_redis_is_wired_through_service_env_and_a_secret(helm: Helm) -> None:
    objs = render(helm)
    service = _one(objs, "Service", "redis")
    secret = _one(objs, "Secret", "redis")
    statefulset = _one(objs, "StatefulSet", "redis")
    name = service["metadata"]["name"]
    assert name == secret["metadata"]["name"] == statefulset["metadata"]["name"]
    prefix = name.upper().replace("-", "_")
    env = _env(_operator(objs))
    assert env["FEDFLEET_STORE_URL"]["value"] == (
        f"redis://$({prefix}_SERVICE_HOST):$({prefix}_SERVICE_PORT)/0"
    )
    assert env["FEDFLEET_REDIS_PASSWORD"] == {
        "name": "FEDFLEET_REDIS_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": name, "key": "redis-password"}},
    }
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert len(password) == 32
    rendered = json.dumps(objs)
    assert rendered.count(password) == 0  # never a literal anywhere, only base64 in the Secret
    assert (service["spec"]["type"], service["spec"]["ports"][0]["port"]) == ("ClusterIP", 6379)


def test_bundled_redis_statefulset(helm: Helm) -> None:
    statefulset = _one(render(helm), "StatefulSet", "redis")
    assert statefulset["spec"]["replicas"] == 1
    pod = statefulset["spec"]["template"]["spec"]
    [redis] = pod["containers"]
    assert redis["command"] == ["redis-server"]
    args = redis["args"]
    for flag, value in [
        ("--requirepass", "$(REDIS_PASSWORD)"),
        ("--appendonly", "yes"),
        ("--appendfsync", "always"),
        ("--dir", "/data"),
    ]:
        assert args[args.index(flag) + 1] == value
    assert "--bind" not in args
    assert _env(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    for probe in ("readinessProbe", "livenessProbe"):
        assert redis[probe]["tcpSocket"] == {"port": 6379}
    assert pod["securityContext"]["runAsUser"] in (999, 65534)
    # durable by default: the append-only file lives on a claim, not in the pod
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert "volumes" not in pod
    assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]


def test_redis_without_persistence_uses_an_empty_dir(helm: Helm) -> None:
    statefulset = _one(
        render(helm, "--set", "redis.persistence.enabled=false"), "StatefulSet", "redis"
    )
    assert {"name": "data", "emptyDir": {}} in statefulset["spec"]["template"]["spec"]["volumes"]
    assert "volumeClaimTemplates" not in statefulset["spec"]


def test_redis_persistence_uses_a_volume_claim(helm: Helm) -> None:
    statefulset = _one(
        render(helm, "-f", str(CHART / "ci" / "bundled-values.yaml")), "StatefulSet", "redis"
    )
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "volumes" not in statefulset["spec"]["template"]["spec"]


def test_redis_bind_pod_ip(helm: Helm) -> None:
    statefulset = _one(render(helm, "--set", "redis.bindPodIP=true"), "StatefulSet", "redis")
    [redis] = statefulset["spec"]["template"]["spec"]["containers"]
    assert redis["args"][redis["args"].index("--bind") + 1] == "$(POD_IP)"
    assert _env(redis)["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_external_redis_deploys_no_redis(helm: Helm) -> None:
    objs = render(helm, "-f", str(CHART / "ci" / "external-redis-values.yaml"))
    assert not any(_component(o) == "redis" for o in objs)
    assert not any(o["kind"] in ("StatefulSet", "Secret") for o in objs)
    env = _env(_operator(objs))
    assert env["FEDFLEET_STORE_URL"]["value"] == "redis://redis.storage.svc.cluster.local:6379/0"
    assert env["FEDFLEET_REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "shared-redis", "key": "password"}
    }


def test_external_redis_without_a_password(helm: Helm) -> None:
    objs = render(helm, "--set", "redis.external.url=redis://r:6379/1")
    env = _env(_operator(objs))
    assert env["FEDFLEET_STORE_URL"]["value"] == "redis://r:6379/1"
    assert "FEDFLEET_REDIS_PASSWORD" not in env


def test_existing_secret_for_the_bundled_redis(helm: Helm) -> None:
    objs = render(helm, "--set", "redis.auth.existingSecret=mine")
    assert not any(o["kind"] == "Secret" for o in objs)
    ref = {"secretKeyRef": {"name": "mine", "key": "redis-password"}}
    assert _env(_operator(objs))["FEDFLEET_REDIS_PASSWORD"]["valueFrom"] == ref
    [redis] = _one(objs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    assert _env(redis)["REDIS_PASSWORD"]["valueFrom"] == ref


def test_default_objects(helm: Helm) -> None:
    assert _kinds(render(helm)) == sorted(
        [
            ("ClusterKopfPeering", "operator"),
            ("ClusterRole", "operator"),
            ("ClusterRoleBinding", "operator"),
            ("Deployment", "operator"),
            ("Pod", "test"),
            ("Secret", "redis"),
            ("Service", "operator"),
            ("Service", "redis"),
            ("ServiceAccount", "operator"),
            ("StatefulSet", "redis"),
        ]
    )


def test_long_release_names_are_truncated(helm: Helm) -> None:
    long = "r" * 53
    proc = _run(
        helm, "template", long, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION
    )
    assert proc.returncode == 0, proc.stderr
    for obj in (d for d in yaml.safe_load_all(proc.stdout) if d):
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and not name.endswith("-"), name
        if obj["kind"] == "StatefulSet":
            assert len(name) <= 52, name  # controller-revision-hash label: <name>-<10 chars>


def test_helm_test_pod(helm: Helm) -> None:
    objs = render(helm)
    pod = _one(objs, "Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    assert container["command"][:2] == ["python3", "-c"]
    script = container["command"][2]
    compile(script, "test-connection", "exec")
    assert "$(" not in script  # the kubelet would expand it
    env = _env(container)
    assert env["FEDFLEET_STORE_URL"] == _env(_operator(objs))["FEDFLEET_STORE_URL"]
    assert "secretKeyRef" in env["FEDFLEET_REDIS_PASSWORD"]["valueFrom"]
    operator_svc = _one(objs, "Service", "operator")
    prefix = operator_svc["metadata"]["name"].upper().replace("-", "_")
    assert f"$({prefix}_SERVICE_HOST)" in env["FEDFLEET_OPERATOR_HEALTHZ"]["value"]


# --- values and their schema ---------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    ["bogus=1", "redis.bogus=1", "operator.peering.extra=1", "image.pullPolicy=Sometimes"],
)
def test_values_schema_refuses_unknown_or_bad_values(helm: Helm, setting: str) -> None:
    proc = _run(
        helm, "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, "--set", setting
    )
    assert proc.returncode != 0
    assert "schema" in proc.stderr
    assert setting.split("=")[0].split(".")[-1] in proc.stderr or "pullPolicy" in proc.stderr


def _schema_nodes(node: Any, path: str = "") -> Iterator[tuple[str, Obj]]:
    if isinstance(node, dict):
        if "type" in node or "$ref" in node:
            yield path, node
        for key, sub in node.items():
            yield from _schema_nodes(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _schema_nodes(sub, f"{path}/{i}")


def test_values_schema_is_closed_and_described() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects = []
    for path, node in _schema_nodes(schema):
        if node.get("type") == "object":
            assert "additionalProperties" in node, f"{path}: additionalProperties unset"
            if node["additionalProperties"] is True:
                open_objects.append(path)
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description") or "$ref" in sub, f"{path}/{name}: no description"
    # Only pass-through Kubernetes objects the API server validates stay open.
    assert all(
        p.split("/")[-1] in ("nodeAffinity", "podAffinity", "podAntiAffinity") for p in open_objects
    )


def test_values_yaml_is_documented() -> None:
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# yaml-language-server: $schema=values.schema.json"
    for i, line in enumerate(lines):
        if re.match(r"\s*[A-Za-z][\w-]*:", line):
            previous = lines[i - 1].strip()
            assert previous.startswith("#"), f"values.yaml:{i + 1}: no comment above {line!r}"
    values = yaml.safe_load("\n".join(lines))
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))

    def keys(node: Any, sch: Obj, path: str) -> None:
        if isinstance(node, dict) and "properties" in sch:
            assert set(node) <= set(sch["properties"]), path
            for k, v in node.items():
                keys(v, sch["properties"][k], f"{path}.{k}")

    keys(values, schema, "values")
    assert set(values) == set(schema["properties"])  # every documented key has a default
