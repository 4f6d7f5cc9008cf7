"""FLPopulation on the operator's side, without a cluster: the builders of its Secrets, its
gateway Deployment and its Service, what it adds to a job's selector Deployment (and that jobs
without one are built exactly as before), its status, validation of its spec, and its kopf
handlers against a fake Kubernetes API (the Secret made once and never rotated, the user's own
Secret left alone, ownership by the FLPopulation, the gateway following the spec, the timer's
job list)."""

from __future__ import annotations

import base64
import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import kopf
import pytest

from fedfleet.core.population_spec import (
    FLPopulationSpec,
    parse_quantity,
    population_enroll_token,
)
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.service.enrollment import enroll_token
from fedfleet.store.memory import MemoryStore
from fedfleet_operator.builders import build_job_secret, build_selector_deployment, spec_hash
from fedfleet_operator.context import MEMO_KEY, OperatorContext
from fedfleet_operator.handlers import register_all
from fedfleet_operator.handlers.population import on_population, sync_population_status
from fedfleet_operator.main import QuietStatusTimer
from fedfleet_operator.population import (
    LABEL_POPULATION,
    InvalidPopulation,
    PopulationRef,
    active_jobs,
    build_devices_service,
    build_enrollment_secret,
    build_gateway_deployment,
    build_gateway_secret,
    endpoint_url,
    population_from_body,
    population_ref,
    population_secret_from,
    population_status,
    with_population,
)
from fedfleet_operator.reconcile import apply_children
from fedfleet_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

NS, POP, UID = "team-a", "phones", "pop-uid-1"
SETTINGS = OperatorSettings(store_url="redis://:pw@10.0.0.12:6379/0", pod_name="op-0")


def _job(name: str = "mnist", population: str = POP) -> FLJob:
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"population": population, "actors": {"selectors": 2}},
        }
    )


def _population(spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLPopulation",
        "metadata": {"name": POP, "namespace": NS, "uid": UID, "generation": 1, **meta},
        "spec": spec or {},
    }


# -- fakes ----------------------------------------------------------------------------------------


def strategic_merge(original: Any, patch: Any) -> Any:
    """What the API server makes of a strategic-merge patch of a Deployment, for the fields
    the operator patches: maps merged key by key, lists of objects merged by their key (a
    mount by ``mountPath``, anything else by ``name``), new items appended; other lists
    (a secret volume's ``items``) replaced; an item marked ``$patch: delete`` removed."""
    if isinstance(original, dict) and isinstance(patch, dict):
        out = copy.deepcopy(original)
        for key, value in patch.items():
            out[key] = strategic_merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    if isinstance(original, list) and isinstance(patch, list) and patch:
        if all(
            isinstance(item, dict) and ("name" in item or "mountPath" in item)
            for item in [*original, *patch]
        ):
            merged = copy.deepcopy(original)
            for item in patch:
                key = "mountPath" if "mountPath" in item else "name"
                at = [i for i, old in enumerate(merged) if old.get(key) == item[key]]
                if item.get("$patch") == "delete":
                    merged = [old for i, old in enumerate(merged) if i not in at]
                elif at:
                    merged[at[0]] = strategic_merge(merged[at[0]], item)
                else:
                    merged.append(copy.deepcopy(item))
            return merged
    return copy.deepcopy(patch)


@dataclass
class FakeKube:
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    populations: dict[str, dict[str, Any]] = field(default_factory=dict)
    fljobs: list[dict[str, Any]] = field(default_factory=list)
    population_status: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, body: Mapping[str, Any]) -> None:
        assert body["metadata"]["namespace"] == NS
        self.objects[(str(body["kind"]), str(body["metadata"]["name"]))] = copy.deepcopy(dict(body))

    def patch_existing(self, body: Mapping[str, Any]) -> bool:
        assert body["metadata"]["namespace"] == NS
        key = (str(body["kind"]), str(body["metadata"]["name"]))
        if key not in self.objects:
            return False
        self.objects[key] = strategic_merge(self.objects[key], dict(body))
        return True

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        secret = self.objects.get(("Secret", name))
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}

    def read_population(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.populations.get(name))

    def list_fljobs(self, namespace: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.fljobs)

    def patch_population_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.population_status.append(dict(status))


@dataclass
class Events:
    warnings: list[tuple[str, str]] = field(default_factory=list)

    def info(self, body: kopf.Body, *, reason: str, message: str) -> None:
        pass

    def warn(self, body: kopf.Body, *, reason: str, message: str) -> None:
        self.warnings.append((reason, message))


def _ctx(kube: FakeKube, events: Events | None = None) -> OperatorContext:
    return OperatorContext(SETTINGS, cast(Any, kube), MemoryStore(), cast(Any, events or Events()))


def _memo(ctx: OperatorContext) -> kopf.Memo:
    memo = kopf.Memo()
    memo[MEMO_KEY] = ctx
    return memo


def _body(raw: dict[str, Any]) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, copy.deepcopy(raw)))


def _run(ctx: OperatorContext, raw: dict[str, Any]) -> kopf.Patch:
    patch = kopf.Patch()
    on_population(body=_body(raw), patch=patch, memo=_memo(ctx), logger=logging.getLogger("test"))
    return patch


# -- builders -------------------------------------------------------------------------------------


def test_the_enroll_token_is_the_published_derivation() -> None:
    # The selectors call the same function (fedfleet.service.enrollment.enroll_token); the
    # token the operator writes into the Secret must match the protocol's test vector.
    vectors = json.loads((ROOT / "docs" / "vectors" / "credentials.json").read_text())
    assert population_enroll_token(bytes.fromhex(vectors["secret_hex"])) == vectors["enroll_token"]
    assert enroll_token(bytes.fromhex(vectors["secret_hex"])) == vectors["enroll_token"]
    with pytest.raises(ValueError, match="16 bytes"):
        population_enroll_token(b"short")


def test_enrollment_secret_holds_the_secret_as_hex_and_its_token() -> None:
    secret = bytes(range(32))
    body = build_enrollment_secret(POP, NS, secret)
    assert body["metadata"]["name"] == "phones-enrollment"
    assert body["metadata"]["labels"][LABEL_POPULATION] == POP
    assert "fedfleet.dev/job" not in body["metadata"]["labels"]  # no job owns it
    data = {k: base64.b64decode(v).decode() for k, v in body["data"].items()}
    assert data == {"population-secret": secret.hex(), "enroll-token": enroll_token(secret)}
    assert population_secret_from(data) == secret
    assert population_secret_from({"population-secret": "nothex"}) is None
    assert population_secret_from({"population-secret": "ab" * 8}) is None  # 8 bytes: too few
    assert population_secret_from(None) is None


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_devices_service_selects_the_gateway_pods_with_no_session_affinity() -> None:
    spec = FLPopulationSpec()
    svc = build_devices_service(POP, NS, spec)
    assert svc["metadata"]["name"] == "phones-devices"
    assert "annotations" not in svc["metadata"]
    assert svc["spec"] == {
        "type": "ClusterIP",
        "selector": {"fedfleet.dev/population": POP, "fedfleet.dev/role": "gateway"},
        "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}],
        # Written out: a patch that left it out would keep an older Service's ClientIP.
        "sessionAffinity": "None",
    }
    # It reaches the gateway's pods and never a job's selector pods, though both carry the
    # population label.
    gateway = build_gateway_deployment(POP, NS, spec, SETTINGS)["spec"]["template"]
    job = _job()
    selector = with_population(
        build_selector_deployment(job, NS, SETTINGS, spec_hash(job.spec)),
        PopulationRef(POP, "phones-enrollment"),
    )["spec"]["template"]
    assert _selects(svc["spec"]["selector"], gateway["metadata"]["labels"])
    assert not _selects(svc["spec"]["selector"], selector["metadata"]["labels"])
    lb = population_from_body(
        POP,
        {
            "service": {
                "type": "LoadBalancer",
                "port": 443,
                "annotations": {"cloud.example/lb": "external"},
            }
        },
    )
    svc = build_devices_service(POP, NS, lb)
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"][0]["port"] == 443 and svc["spec"]["ports"][0]["targetPort"] == 8080
    assert svc["metadata"]["annotations"] == {"cloud.example/lb": "external"}


def test_gateway_secret_holds_only_the_stores_password() -> None:
    body = build_gateway_secret(POP, NS, "s3cret")
    assert body["metadata"]["name"] == "phones-gateway"
    assert body["metadata"]["labels"][LABEL_POPULATION] == POP
    assert "fedfleet.dev/job" not in body["metadata"]["labels"]
    assert {k: base64.b64decode(v).decode() for k, v in body["data"].items()} == {
        "redis-password": "s3cret"
    }
    # The key the job Secret uses for the same password, so both are read the same way.
    assert set(build_job_secret("mnist", NS, "ab" * 32, "s3cret")["data"]) >= set(body["data"])


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_gateway_deployment_runs_the_gateway_hardened_with_the_population_secret() -> None:
    settings = OperatorSettings(
        store_url="redis://:pw-in-url@10.0.0.12:6379/0",
        pod_name="op-0",
        actor_image="registry.example/fedfleet/services:9.9",
        image_pull_policy="Always",
        actor_tick_seconds=0.25,
    )
    body = build_gateway_deployment(POP, NS, FLPopulationSpec(), settings)
    assert body["metadata"]["name"] == "phones-gateway"
    assert body["metadata"]["labels"][LABEL_POPULATION] == POP
    assert body["metadata"]["labels"]["fedfleet.dev/role"] == "gateway"
    assert "fedfleet.dev/job" not in body["metadata"]["labels"]
    spec = body["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"] == {
        "matchLabels": {"fedfleet.dev/population": POP, "fedfleet.dev/role": "gateway"}
    }
    template = spec["template"]
    assert _selects(spec["selector"]["matchLabels"], template["metadata"]["labels"])
    pod = template["spec"]
    assert pod["automountServiceAccountToken"] is False  # it never calls the Kubernetes API
    assert pod["securityContext"] == {"fsGroup": 65534}
    [container] = pod["containers"]
    assert container["command"] == ["fedfleet", "population", "gateway"]
    assert container["image"] == "registry.example/fedfleet/services:9.9"
    assert container["imagePullPolicy"] == "Always"
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    # The selectors' start-up allowance, so a slow node does not kill it while it imports.
    selector = build_selector_deployment(_job(), NS, settings, "h")["spec"]["template"]["spec"]
    assert container["startupProbe"] == selector["containers"][0]["startupProbe"]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}
    env = _env(container)
    assert env["FEDFLEET_POPULATION"] == POP
    assert env["FEDFLEET_STORE_URL"] == "redis://10.0.0.12:6379/0"  # no password in the body
    assert env["FEDFLEET_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "phones-gateway", "key": "redis-password"}
    }
    assert "pw-in-url" not in json.dumps(body)
    assert env["FEDFLEET_HOST"] == "$(POD_IP)" and env["FEDFLEET_PORT"] == "8080"
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_IP") < names.index("FEDFLEET_HOST")  # expanded in order
    assert env["FEDFLEET_TICK_SECONDS"] == "0.25"
    assert env["FEDFLEET_ACTOR_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "FEDFLEET_JOB_SECRET" not in env and "FEDFLEET_MANIFEST_YAML" not in env
    # The secret file it is told about is the mounted item, mounted as the selectors get it.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_file = Path(env["FEDFLEET_POPULATION_SECRET_FILE"])
    mount = mounts[str(secret_file.parent)]
    assert mount.get("readOnly") is True
    secret_volume = volumes[mount["name"]]["secret"]
    assert secret_volume["secretName"] == "phones-enrollment"
    assert secret_volume["items"] == [{"key": "population-secret", "path": secret_file.name}]
    served = with_population(
        build_selector_deployment(_job(), NS, settings, "h"),
        PopulationRef(POP, "phones-enrollment"),
    )
    assert served["spec"]["template"]["spec"]["volumes"][-1] == volumes[mount["name"]]
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}} and "/tmp" in mounts
    # Without an actor image setting: this release's services image.
    plain = build_gateway_deployment(POP, NS, FLPopulationSpec(), SETTINGS)
    assert plain["spec"]["template"]["spec"]["containers"][0]["image"] == "fedfleet/services:0.1.0"


def test_gateway_replicas_resources_and_the_users_secret_come_from_the_spec() -> None:
    spec = population_from_body(
        POP,
        {
            "enrollment": {"secretName": "own-secret"},
            "gateway": {
                "replicas": 3,
                "resources": {"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}},
            },
        },
    )
    body = build_gateway_deployment(POP, NS, spec, SETTINGS)
    assert body["spec"]["replicas"] == 3
    pod = body["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "250m"},
        "limits": {"memory": "1Gi"},
    }
    [secret] = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert secret["secretName"] == "own-secret"
    # resources: {} means no requests and no limits at all, not the defaults.
    bare = population_from_body(POP, {"gateway": {"resources": {}}})
    assert (
        build_gateway_deployment(POP, NS, bare, SETTINGS)["spec"]["template"]["spec"]["containers"][
            0
        ]["resources"]
        == {}
    )


def test_selector_deployment_serving_a_population_adds_only_label_secret_and_env() -> None:
    job = _job()
    plain = build_selector_deployment(job, NS, SETTINGS, spec_hash(job.spec))
    served = with_population(plain, PopulationRef(POP, "phones-enrollment"))
    assert served is not plain and "securityContext" not in plain["spec"]["template"]["spec"]
    template = served["spec"]["template"]
    assert template["metadata"]["labels"][LABEL_POPULATION] == POP
    assert served["spec"]["selector"] == plain["spec"]["selector"]  # immutable: untouched
    pod = template["spec"]
    assert pod["securityContext"] == {"fsGroup": 65534}
    volume = pod["volumes"][-1]
    assert volume == {
        "name": "population-secret",
        "secret": {
            "secretName": "phones-enrollment",
            "defaultMode": 0o440,
            "items": [{"key": "population-secret", "path": "population-secret"}],
        },
    }
    [container] = pod["containers"]
    assert container["volumeMounts"][-1] == {
        "name": "population-secret",
        "mountPath": "/var/run/fedfleet/population",
        "readOnly": True,
    }
    assert container["env"][-1] == {
        "name": "FEDFLEET_POPULATION_SECRET_FILE",
        "value": "/var/run/fedfleet/population/population-secret",
    }
    # Take the additions away: what remains is the Deployment built without a population.
    undone = copy.deepcopy(served)
    t = undone["spec"]["template"]
    del t["metadata"]["labels"][LABEL_POPULATION]
    del t["spec"]["securityContext"]
    t["spec"]["volumes"].pop()
    t["spec"]["containers"][0]["volumeMounts"].pop()
    t["spec"]["containers"][0]["env"].pop()
    assert undone == plain


def _applied(kube: FakeKube, job: FLJob) -> dict[str, dict[str, Any]]:
    owner = _body(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": job.name, "namespace": NS, "uid": "job-uid"},
        }
    )
    apply_children(_ctx(kube), job, owner)
    return {name: body for (kind, name), body in kube.objects.items() if kind == "Deployment"}


def test_a_job_without_a_population_resource_gets_the_selectors_it_always_got() -> None:
    job = _job()
    deployments = _applied(FakeKube(), job)
    expected = build_selector_deployment(job, NS, SETTINGS, spec_hash(job.spec))
    got = copy.deepcopy(deployments["mnist-selector"])
    del got["metadata"]["ownerReferences"]
    assert got == expected


def test_a_job_of_an_existing_population_gets_selectors_that_serve_it() -> None:
    kube = FakeKube(populations={POP: _population({"enrollment": {"secretName": "own-secret"}})})
    deployments = _applied(kube, _job())
    selector = deployments["mnist-selector"]["spec"]["template"]
    assert selector["metadata"]["labels"][LABEL_POPULATION] == POP
    assert selector["spec"]["volumes"][-1]["secret"]["secretName"] == "own-secret"
    for role in ("coordinator", "aggregator"):  # only selectors serve devices
        assert (
            LABEL_POPULATION
            not in deployments[f"mnist-{role}"]["spec"]["template"]["metadata"]["labels"]
        )
    # Another population's job, and a population being deleted, change nothing.
    other = _applied(kube, _job("other", population="watches"))["other-selector"]
    assert LABEL_POPULATION not in other["spec"]["template"]["metadata"]["labels"]
    going = FakeKube(populations={POP: _population(deletionTimestamp="2025-03-01T12:00:00Z")})
    kept = _applied(going, _job())["mnist-selector"]["spec"]["template"]
    assert LABEL_POPULATION not in kept["metadata"]["labels"]


def test_population_ref_uses_the_users_secret_or_the_operators() -> None:
    assert population_ref(_population()) == PopulationRef(POP, "phones-enrollment")
    assert population_ref(_population({"enrollment": {"secretName": "mine"}})) == PopulationRef(
        POP, "mine"
    )
    assert population_ref(_population({"service": {"type": "Bogus"}})) is None


def test_status_names_the_endpoint_the_secret_and_the_unfinished_jobs_of_the_population() -> None:
    jobs = [
        {"metadata": {"name": "b"}, "spec": {"population": POP}, "status": {"phase": "Running"}},
        {"metadata": {"name": "a"}, "spec": {"population": POP}},  # just created: no status
        {"metadata": {"name": "c"}, "spec": {"population": POP}, "status": {"phase": "Succeeded"}},
        {"metadata": {"name": "d"}, "spec": {"population": POP}, "status": {"phase": "Failed"}},
        {"metadata": {"name": "e"}, "spec": {"population": "watches"}, "status": {}},
    ]
    assert active_jobs(POP, jobs) == ["a", "b"]
    status = population_status(POP, NS, FLPopulationSpec(), ["a", "b"], generation=3)
    assert status == {
        "endpoint": "http://phones-devices.team-a.svc:8080",
        "enrollmentSecret": "phones-enrollment",
        "jobs": ["a", "b"],
        "observedGeneration": 3,
    }
    assert endpoint_url(POP, NS, 443) == "http://phones-devices.team-a.svc:443"


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec", "field"),
    [
        (POP, {"service": {"type": "ExternalName"}}, "spec.service.type"),
        (POP, {"service": {"type": "clusterip"}}, "spec.service.type"),
        (POP, {"service": {"port": 0}}, "spec.service.port"),
        (POP, {"service": {"port": 65536}}, "spec.service.port"),
        (POP, {"service": {"port": "8080"}}, "spec.service.port"),
        (POP, {"enrollment": {"secretName": "Not_A_Name"}}, "spec.enrollment.secretName"),
        (POP, {"enrollment": {"secretName": "-leading"}}, "spec.enrollment.secretName"),
        (POP, {"enrollment": {"secretName": ""}}, "spec.enrollment.secretName"),
        (POP, {"enrollment": {"secretname": "x"}}, "spec.enrollment.secretname"),
        (POP, {"gateway": {"replicas": 0}}, "spec.gateway.replicas"),
        (POP, {"gateway": {"replicas": 51}}, "spec.gateway.replicas"),
        (POP, {"gateway": {"replicas": "2"}}, "spec.gateway.replicas"),
        (POP, {"gateway": {"replicas": 1.5}}, "spec.gateway.replicas"),
        (POP, {"gateway": {"resources": {"requests": {"cpu": "lots"}}}}, "spec.gateway"),
        (POP, {"gateway": {"resources": {"requests": {"memory": "-1Gi"}}}}, "spec.gateway"),
        (POP, {"gateway": {"resources": {"requests": {"gpu": "1"}}}}, "spec.gateway"),
        (
            POP,
            {"gateway": {"resources": {"requests": {"memory": "1Gi"}, "limits": {"memory": "1G"}}}},
            "limits.memory 1G is less than requests.memory 1Gi",
        ),
        (
            POP,
            {"gateway": {"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "999m"}}}},
            "limits.cpu 999m is less than requests.cpu 1",
        ),
        ("a" * 56, {}, "metadata.name"),
        ("with.dot", {}, "metadata.name"),
    ],
)
def test_an_unusable_population_is_refused_naming_the_field(
    name: str, spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidPopulation, match=field.replace(".", r"\.")):
        population_from_body(name, spec)


def test_a_valid_population_gets_its_defaults() -> None:
    spec = population_from_body(POP, {"enrollment": {"secretName": "my.secret-1"}})
    assert (spec.service.type.value, spec.service.port, spec.service.annotations) == (
        "ClusterIP",
        8080,
        {},
    )
    assert spec.enrollment.secret_name == "my.secret-1"
    assert (spec.gateway.replicas, spec.gateway.resources) == (1, None)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("100m", "0.1"),
        ("2", "2"),
        ("1.5", "1.5"),
        ("128Mi", str(128 * 2**20)),
        ("1G", "1e9"),
        ("1e3", "1000"),
        ("1E", "1e18"),
        (".5Ki", "512"),
    ],
)
def test_quantities_are_read_as_kubernetes_reads_them(text: str, value: str) -> None:
    assert parse_quantity(text) == Decimal(value)


@pytest.mark.parametrize("text", ["", "m", "1.2.3", "-1", "1 Gi", "1gi", "1Mb", "0x10"])
def test_a_malformed_quantity_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a resource quantity"):
        parse_quantity(text)


# -- handlers -------------------------------------------------------------------------------------


def test_create_makes_the_secret_once_and_the_gateway_and_service_owned_by_the_population() -> None:
    kube = FakeKube()
    ctx = _ctx(kube)
    patch = _run(ctx, _population())
    secret = kube.objects[("Secret", "phones-enrollment")]
    service = kube.objects[("Service", "phones-devices")]
    gateway = kube.objects[("Deployment", "phones-gateway")]
    gateway_secret = kube.objects[("Secret", "phones-gateway")]
    assert set(kube.objects) == {
        ("Secret", "phones-enrollment"),
        ("Secret", "phones-gateway"),
        ("Deployment", "phones-gateway"),
        ("Service", "phones-devices"),
    }
    for child in (secret, service, gateway, gateway_secret):
        [ref] = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("FLPopulation", POP, UID)
        assert ref["controller"] is True  # garbage collection removes it with the population
    # The store's password as the operator's settings give it (SETTINGS: in the URL).
    assert kube.read_secret(NS, "phones-gateway") == {"redis-password": "pw"}
    assert gateway["spec"]["replicas"] == 1
    data = kube.read_secret(NS, "phones-enrollment")
    assert data is not None and len(bytes.fromhex(data["population-secret"])) == 32
    assert data["enroll-token"] == enroll_token(bytes.fromhex(data["population-secret"]))
    assert patch["status"]["endpoint"] == "http://phones-devices.team-a.svc:8080"
    assert patch["status"]["enrollmentSecret"] == "phones-enrollment"
    # Converging again (a spec change, an operator restart) never rotates the secret, and
    # the gateway and the Service follow the spec.
    _run(ctx, _population({"service": {"type": "NodePort"}, "gateway": {"replicas": 4}}))
    assert kube.read_secret(NS, "phones-enrollment") == data
    assert kube.objects[("Service", "phones-devices")]["spec"]["type"] == "NodePort"
    assert kube.objects[("Deployment", "phones-gateway")]["spec"]["replicas"] == 4


def test_the_users_own_secret_is_used_and_an_unusable_one_is_never_overwritten() -> None:
    kube = FakeKube()
    patch = _run(_ctx(kube), _population({"enrollment": {"secretName": "mine"}}))
    assert ("Secret", "phones-enrollment") not in kube.objects
    assert ("Secret", "mine") not in kube.objects  # the user's: not the operator's to write
    assert patch["status"]["enrollmentSecret"] == "mine"
    pod = kube.objects[("Deployment", "phones-gateway")]["spec"]["template"]["spec"]
    assert [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v] == ["mine"]
    # A Secret of the operator's name that holds garbage is reported, not replaced.
    broken = FakeKube()
    broken.objects[("Secret", "phones-enrollment")] = {
        "kind": "Secret",
        "metadata": {"name": "phones-enrollment", "namespace": NS},
        "data": {"population-secret": base64.b64encode(b"garbage").decode()},
    }
    before = copy.deepcopy(broken.objects)
    events = Events()
    _run(_ctx(broken, events), _population())
    assert (
        broken.objects[("Secret", "phones-enrollment")] == before[("Secret", "phones-enrollment")]
    )
    assert [reason for reason, _ in events.warnings] == ["EnrollmentSecretUnusable"]


def test_an_invalid_population_gets_a_warning_and_no_children() -> None:
    kube, events = FakeKube(), Events()
    raw = _population({"service": {"port": 0}})
    with pytest.raises(kopf.PermanentError):
        _run(_ctx(kube, events), raw)
    assert kube.objects == {}
    assert events.warnings and "spec.service.port" in events.warnings[0][1]


def test_the_timer_writes_the_jobs_only_when_they_change() -> None:
    kube = FakeKube()
    ctx = _ctx(kube)
    raw = _population()
    raw["status"] = dict(_run(ctx, raw)["status"])
    assert raw["status"]["jobs"] == []
    memo, log = _memo(ctx), logging.getLogger("test")
    sync_population_status(body=_body(raw), memo=memo, logger=log)
    assert kube.population_status == []  # nothing changed: no write
    kube.fljobs = [{"metadata": {"name": "a"}, "spec": {"population": POP}, "status": {}}]
    sync_population_status(body=_body(raw), memo=memo, logger=log)
    assert kube.population_status == [{"jobs": ["a"]}]


def test_the_operator_registers_the_population_handlers_on_flpopulations() -> None:
    registry = kopf.OperatorRegistry()
    register_all(registry, SETTINGS)
    ids = {  # kopf appends the field to an update handler's id: "population-update/spec"
        h.id.split("/")[0]: h
        for h in [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    }
    for handler_id in ("population-create", "population-update", "population-resume"):
        assert ids[handler_id].selector is not None
        assert ids[handler_id].selector.any_name == "flpopulations"
    timer = ids["population-status"]
    assert timer.selector is not None and timer.selector.any_name == "flpopulations"
    assert ids["create"].selector is not None and ids["create"].selector.any_name == "fljobs"
    # Its timer's success lines are kept out of the log, like the FLJob status timer's.
    record = logging.LogRecord("kopf.objects", logging.INFO, "", 0, "%s", ("x",), None)
    record.msg, record.args = "Timer 'population-status' succeeded.", ()
    assert not QuietStatusTimer().filter(record)
