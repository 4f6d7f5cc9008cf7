"""The operator's pure parts: settings, names, validation and the builders of an FLJob's
children, checked against ``operator/CONTRACT.md`` without a cluster."""

from __future__ import annotations

import base64
from typing import Any

import kopf
import pytest
import yaml

from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet_operator.bodies import ChildBody, Container, DeploymentBody, EnvVar
from fedfleet_operator.builders import (
    ACTOR_ROLES,
    actor_replicas,
    build_actor_deployment,
    build_aggregator_deployment,
    build_coordinator_deployment,
    build_job_secret,
    build_plan_configmap,
    build_selector_deployment,
    build_selector_service,
    is_job_secret,
    spec_hash,
)
from fedfleet_operator.naming import (
    ANNOTATION_SPEC_HASH,
    MAX_JOB_NAME,
    ChildRole,
    labels,
    name_problem,
)
from fedfleet_operator.reconcile import new_job_secret, owned
from fedfleet_operator.settings import (
    OperatorSettings,
    SettingsError,
    peering_priority,
    redact_store_url,
    split_store_url,
)
from fedfleet_operator.validation import InvalidJob, job_from_body

pytestmark = pytest.mark.unit

NS = "team-a"
STORE = "redis://:s3cret@10.0.0.12:6379/0"
SECRET = "ab" * 32


def make_job(name: str = "mnist", **spec: Any) -> FLJob:
    base: dict[str, Any] = {
        "population": "phones",
        "rounds": {"total": 20, "goalCount": 1000, "overSelection": 1.3},
        "fleet": {"devices": 5000},
        "actors": {"selectors": 3, "devicesPerAggregator": 500, "maxAggregators": 16},
    }
    for key, value in spec.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": base,
        }
    )


@pytest.fixture
def settings() -> OperatorSettings:
    return OperatorSettings(store_url=STORE, pod_name="fedfleet-operator-0")


def deployments(job: FLJob, settings: OperatorSettings) -> dict[ChildRole, DeploymentBody]:
    h = spec_hash(job.spec)
    return {
        ChildRole.coordinator: build_coordinator_deployment(job, NS, settings, h),
        ChildRole.selector: build_selector_deployment(job, NS, settings, h),
        ChildRole.aggregator: build_aggregator_deployment(job, NS, settings, h),
    }


def container(d: DeploymentBody) -> Container:
    (only,) = d["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: Container) -> dict[str, EnvVar]:
    return {e["name"]: e for e in c["env"]}


# -- names and labels -----------------------------------------------------------------------------


def test_children_are_named_and_labelled_per_contract(settings: OperatorSettings) -> None:
    job = make_job()
    cm = build_plan_configmap(job, NS)
    secret = build_job_secret(job.name, NS, SECRET, "pw")
    svc = build_selector_service(job, NS)
    deps = deployments(job, settings)
    assert cm["metadata"]["name"] == "mnist-plan"
    assert secret["metadata"]["name"] == "mnist-secret"
    assert svc["metadata"]["name"] == "mnist-selector"
    assert {role: d["metadata"]["name"] for role, d in deps.items()} == {
        ChildRole.coordinator: "mnist-coordinator",
        ChildRole.selector: "mnist-selector",
        ChildRole.aggregator: "mnist-aggregator",
    }
    for body in (cm, secret, svc, *deps.values()):
        assert body["metadata"]["namespace"] == NS
        meta_labels = body["metadata"]["labels"]
        assert meta_labels["app.kubernetes.io/name"] == "fedfleet"
        assert meta_labels["app.kubernetes.io/instance"] == "mnist"
        assert meta_labels["app.kubernetes.io/managed-by"] == "fedfleet-operator"
        assert meta_labels["fedfleet.dev/job"] == "mnist"
        assert meta_labels["app.kubernetes.io/component"] == meta_labels["fedfleet.dev/role"]
    assert cm["metadata"]["labels"]["fedfleet.dev/role"] == "plan"
    for role, d in deps.items():
        assert d["metadata"]["labels"] == labels("mnist", role)
        assert d["spec"]["template"]["metadata"]["labels"] == labels("mnist", role)
        assert d["spec"]["selector"]["matchLabels"] == {
            "fedfleet.dev/job": "mnist",
            "fedfleet.dev/role": role.value,
        }


def test_kopf_adopt_makes_every_child_owned_by_the_fljob(settings: OperatorSettings) -> None:
    job = make_job()
    owner = kopf.Body(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "mnist", "namespace": NS, "uid": "uid-1", "labels": {"x": "y"}},
        }
    )
    children: list[ChildBody] = [
        build_plan_configmap(job, NS),
        build_job_secret(job.name, NS, SECRET, ""),
        build_selector_service(job, NS),
        *deployments(job, settings).values(),
    ]
    for child in children:
        name = child["metadata"]["name"]
        body = owned(child, owner)
        (ref,) = body["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "name": "mnist",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert body["metadata"]["name"] == name  # adopt keeps our names
        assert body["metadata"]["labels"]["fedfleet.dev/job"] == "mnist"


# -- the actor pods -------------------------------------------------------------------------------


def test_actor_containers_run_their_role_with_the_contract_env(settings: OperatorSettings) -> None:
    for role, d in deployments(make_job(), settings).items():
        c = container(d)
        assert c["name"] == role.value
        assert c["command"] == ["fedfleet", role.value]
        assert "args" not in c
        env = env_of(c)
        assert env["FEDFLEET_MANIFEST_YAML"]["valueFrom"] == {
            "configMapKeyRef": {"name": "mnist-plan", "key": "fljob.yaml"}
        }
        assert env["FEDFLEET_JOB_SECRET"]["valueFrom"] == {
            "secretKeyRef": {"name": "mnist-secret", "key": "job-secret"}
        }
        assert env["FEDFLEET_REDIS_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "mnist-secret", "key": "redis-password"}
        }
        # The password goes through the Secret only, never as a literal in the Deployment.
        assert env["FEDFLEET_STORE_URL"] == {
            "name": "FEDFLEET_STORE_URL",
            "value": "redis://10.0.0.12:6379/0",
        }
        assert env["FEDFLEET_ACTOR_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["FEDFLEET_HOST"]["value"] == "$(POD_IP)"
        assert env["FEDFLEET_PORT"]["value"] == "8080"
        assert env["FEDFLEET_ADVERTISE"]["value"] == "http://$(POD_IP):8080"
        assert env["FEDFLEET_TICK_SECONDS"]["value"] == "0.5"
        assert env["FEDFLEET_LEASE_TTL"]["value"] == "10"
        names = [e["name"] for e in c["env"]]
        # $(POD_IP) expands only when POD_IP is defined earlier in the list.
        assert names.index("POD_IP") < names.index("FEDFLEET_HOST")
        assert names.index("POD_IP") < names.index("FEDFLEET_ADVERTISE")
        assert "s3cret" not in yaml.safe_dump(d)


def test_actor_ports_probes_and_security_context(settings: OperatorSettings) -> None:
    for d in deployments(make_job(), settings).values():
        c = container(d)
        assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
        assert c["readinessProbe"]["periodSeconds"] == 2
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
        assert c["livenessProbe"]["periodSeconds"] == 10
        assert c["livenessProbe"]["failureThreshold"] == 3
        # A slow start is not a dead actor: liveness counts only once /healthz has answered.
        startup = c["startupProbe"]
        assert startup["httpGet"] == {"path": "/healthz", "port": 8080}
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget > c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"]
        assert c["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 65534,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
        assert c["resources"]["requests"]
        pod = d["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_image_is_the_jobs_own_then_the_operators_then_the_release_default(
    settings: OperatorSettings,
) -> None:
    task_job = make_job(actors={"image": "registry.example/acme-task:1.2"})
    plain = make_job()
    pinned = OperatorSettings(
        store_url=STORE, actor_image="fedfleet/services:9", image_pull_policy="Always"
    )
    for role in ACTOR_ROLES:
        # A job's task image wins over the operator's (the chart's actors.image) ...
        d = build_actor_deployment(task_job, NS, pinned, spec_hash(task_job.spec), role)
        assert (container(d)["image"], container(d)["imagePullPolicy"]) == (
            "registry.example/acme-task:1.2",
            "Always",
        )
        # ... a job without one runs the operator's, else the release's services image.
        d = build_actor_deployment(plain, NS, pinned, spec_hash(plain.spec), role)
        assert container(d)["image"] == "fedfleet/services:9"
        d = build_actor_deployment(plain, NS, settings, spec_hash(plain.spec), role)
        assert container(d)["image"] == "fedfleet/services:0.1.0"
        # FLJobs from before the field was optional carry the old CRD default: still the
        # operator's image for them.
        old = make_job(actors={"image": "fedfleet/services:0.1.0"})
        d = build_actor_deployment(old, NS, pinned, spec_hash(old.spec), role)
        assert container(d)["image"] == "fedfleet/services:9"


def test_actor_volumes_are_mounted_read_only_into_every_actor_pod(
    settings: OperatorSettings,
) -> None:
    job = make_job(
        actors={
            "volumes": [
                {"name": "task-code", "mountPath": "/task/linreg", "configMap": "linreg"},
                {"name": "eval", "mountPath": "/data", "persistentVolumeClaim": "eval-data"},
            ]
        },
        evaluation={"data": "/data/test.csv"},
    )
    for role in ACTOR_ROLES:
        d = build_actor_deployment(job, NS, settings, spec_hash(job.spec), role)
        pod = d["spec"]["template"]["spec"]
        assert pod["volumes"] == [
            {"name": "tmp", "emptyDir": {}},
            {"name": "task-code", "configMap": {"name": "linreg"}},
            {
                "name": "eval",
                "persistentVolumeClaim": {"claimName": "eval-data", "readOnly": True},
            },
        ]
        assert container(d)["volumeMounts"] == [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "task-code", "mountPath": "/task/linreg", "readOnly": True},
            {"name": "eval", "mountPath": "/data", "readOnly": True},
        ]
    # The actors read the same paths from the plan's manifest.
    plan = yaml.safe_load(build_plan_configmap(job, NS)["data"]["fljob.yaml"])
    assert plan["spec"]["evaluation"]["data"] == "/data/test.csv"
    assert plan["spec"]["actors"]["volumes"][0]["configMap"] == "linreg"


@pytest.mark.parametrize(
    ("volumes", "complaint"),
    [
        ([{"name": "v", "mountPath": "/data"}], "exactly one of configMap"),
        (
            [{"name": "v", "mountPath": "/d", "configMap": "a", "persistentVolumeClaim": "b"}],
            "exactly one of configMap",
        ),
        ([{"name": "tmp", "mountPath": "/data", "configMap": "a"}], "the pods' own"),
        ([{"name": "v", "mountPath": "/tmp/", "configMap": "a"}], "the pods' own"),
        ([{"name": "v", "mountPath": "data", "configMap": "a"}], "mountPath"),
        (
            [
                {"name": "a", "mountPath": "/data", "configMap": "a"},
                {"name": "b", "mountPath": "/data/", "configMap": "b"},
            ],
            "same mountPath",
        ),
        (
            [
                {"name": "a", "mountPath": "/a", "configMap": "a"},
                {"name": "a", "mountPath": "/b", "configMap": "b"},
            ],
            "same name",
        ),
    ],
)
def test_bad_actor_volumes_are_refused(volumes: list[dict[str, Any]], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        make_job(actors={"volumes": volumes})


# -- replicas -------------------------------------------------------------------------------------


def test_replicas_from_the_spec(settings: OperatorSettings) -> None:
    deps = deployments(make_job(), settings)
    assert deps[ChildRole.coordinator]["spec"]["replicas"] == 2
    assert deps[ChildRole.selector]["spec"]["replicas"] == 3
    # ceil(1000 x 1.3 / 500) = ceil(2.6) = 3
    assert deps[ChildRole.aggregator]["spec"]["replicas"] == 3


def test_aggregators_are_capped_and_at_least_one() -> None:
    capped = make_job(actors={"maxAggregators": 2})
    assert actor_replicas(capped.spec, ChildRole.aggregator) == 2
    small = make_job(rounds={"goalCount": 10})
    assert actor_replicas(small.spec, ChildRole.aggregator) == 1


def test_suspended_job_has_no_actor_replicas(settings: OperatorSettings) -> None:
    deps = deployments(make_job(suspend=True), settings)
    assert {d["spec"]["replicas"] for d in deps.values()} == {0}
    with pytest.raises(ValueError):
        actor_replicas(make_job().spec, ChildRole.plan)


# -- policy hash ----------------------------------------------------------------------------------


def test_spec_hash_follows_policy_not_sizing() -> None:
    base = spec_hash(make_job().spec)
    assert len(base) == 64
    assert spec_hash(make_job().spec) == base
    assert spec_hash(make_job(rounds={"total": 21}).spec) != base
    assert spec_hash(make_job(rounds={"reportingTimeoutSeconds": 30}).spec) != base
    assert spec_hash(make_job(plan={"learningRate": 0.05}).spec) != base
    assert spec_hash(make_job(aggregation={"algorithm": "fedadam"}).spec) != base
    assert spec_hash(make_job(eligibility={"requireCharging": False}).spec) != base
    assert spec_hash(make_job(actors={"selectors": 7}).spec) == base
    assert spec_hash(make_job(actors={"maxAggregators": 1}).spec) == base
    assert spec_hash(make_job(suspend=True).spec) == base


def test_spec_hash_annotates_every_actor_pod_template(settings: OperatorSettings) -> None:
    job = make_job()
    for d in deployments(job, settings).values():
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {ANNOTATION_SPEC_HASH: spec_hash(job.spec)}


# -- plan ConfigMap, Secret, Service --------------------------------------------------------------


def test_plan_configmap_holds_a_manifest_actors_accept() -> None:
    job = make_job(rounds={"targetAccuracy": 0.9})
    cm = build_plan_configmap(job, NS)
    assert list(cm["data"]) == ["fljob.yaml"]
    parsed = parse_manifest(yaml.safe_load(cm["data"]["fljob.yaml"]))
    assert parsed.key == "team-a/mnist"
    assert parsed.spec == job.spec
    assert parsed.metadata.name == "mnist"


def test_job_secret_holds_the_secret_and_the_password() -> None:
    secret = build_job_secret("mnist", NS, SECRET, "pw")
    assert secret["type"] == "Opaque"
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {"job-secret": SECRET, "redis-password": "pw"}
    with pytest.raises(ValueError):
        build_job_secret("mnist", NS, "too-short", "pw")


def test_new_job_secrets_are_random_64_hex() -> None:
    a, b = new_job_secret(), new_job_secret()
    assert is_job_secret(a) and is_job_secret(b) and a != b
    assert not is_job_secret(None) and not is_job_secret("AB" * 32)


def test_selector_service_is_the_device_api() -> None:
    svc = build_selector_service(make_job(), NS)
    assert svc["spec"] == {
        "type": "ClusterIP",
        "selector": {"fedfleet.dev/job": "mnist", "fedfleet.dev/role": "selector"},
        "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}],
        # a device's plan poll reaches the selector that holds its selection
        "sessionAffinity": "ClientIP",
    }


def test_actor_deployment_refuses_non_actor_roles(settings: OperatorSettings) -> None:
    with pytest.raises(ValueError):
        build_actor_deployment(make_job(), NS, settings, "h", ChildRole.plan)
    assert ChildRole.plan not in ACTOR_ROLES


# -- validation -----------------------------------------------------------------------------------


def raw(name: str = "mnist", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": name, "namespace": NS, "uid": "u", "managedFields": [{}]},
        "spec": {"population": "phones", **spec},
        "status": {"phase": "Running"},
    }


def test_job_from_body_validates_the_whole_object() -> None:
    job = job_from_body(raw())
    assert job.key == "team-a/mnist"
    with pytest.raises(InvalidJob, match=r"goalCount \(50\) exceeds fleet.devices \(10\)"):
        job_from_body(raw(rounds={"goalCount": 50}, fleet={"devices": 10}))


def test_names_that_cannot_name_children_are_invalid() -> None:
    assert name_problem("a" * MAX_JOB_NAME) is None
    assert name_problem("a" * (MAX_JOB_NAME + 1)) is not None
    assert name_problem("my.job") is not None
    assert name_problem("9lives") is not None
    with pytest.raises(InvalidJob, match="DNS-1035"):
        job_from_body(raw(name="my.job"))


# -- settings -------------------------------------------------------------------------------------


def test_settings_from_env() -> None:
    s = OperatorSettings.from_env(
        {
            "FEDFLEET_STORE_URL": "redis://redis:6379/0",
            "FEDFLEET_REDIS_PASSWORD": "pw",
            "FEDFLEET_NAMESPACES": "a, b,,",
            "FEDFLEET_STATUS_INTERVAL": "2.5",
            "FEDFLEET_ACTOR_IMAGE": "img:1",
            "POD_NAME": "op-1",
        }
    )
    assert s.namespaces == ("a", "b") and not s.clusterwide
    assert s.status_interval == 2.5 and s.actor_image == "img:1"
    assert s.peering == "fedfleet" and s.image_pull_policy == "IfNotPresent"
    assert (s.actor_tick_seconds, s.lease_ttl) == (0.5, 10.0)
    assert s.job_redis_password == "pw" and s.pod_name == "op-1"
    assert OperatorSettings.from_env({"FEDFLEET_STORE_URL": "redis://r:6379/0"}).clusterwide


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"FEDFLEET_STORE_URL": "redis://r/0", "FEDFLEET_STATUS_INTERVAL": "soon"},
        {"FEDFLEET_STORE_URL": "redis://r/0", "FEDFLEET_LEASE_TTL": "0"},
        {"FEDFLEET_STORE_URL": "redis://r/0", "FEDFLEET_ACTOR_IMAGE_PULL_POLICY": "Sometimes"},
        {"FEDFLEET_STORE_URL": "redis://r/0", "FEDFLEET_CLEANUP_ATTEMPTS": "0"},
    ],
)
def test_settings_errors_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="FEDFLEET_"):
        OperatorSettings.from_env(env)


def test_store_url_passwords_move_to_the_secret() -> None:
    assert split_store_url("redis://:pw@h:6379/0") == ("redis://h:6379/0", "pw")
    assert split_store_url("redis://user:pw@h/1") == ("redis://user@h/1", "pw")
    assert split_store_url("redis://h:6379/0") == ("redis://h:6379/0", None)
    assert redact_store_url("rediss://:pw@[::1]:6380/0") == "rediss://[::1]:6380/0"
    s = OperatorSettings(store_url="redis://:pw@h:6379/0")
    assert (s.actor_store_url, s.job_redis_password) == ("redis://h:6379/0", "pw")
    explicit = OperatorSettings(store_url="redis://:pw@h:6379/0", redis_password="other")
    assert explicit.job_redis_password == "other"


def test_peering_priorities_are_stable_and_distinct() -> None:
    assert peering_priority("op-a") == peering_priority("op-a")
    assert peering_priority("op-a") != peering_priority("op-b")
    assert all(p >= 1 for p in (peering_priority(f"op-{i}") for i in range(50)))


def test_only_a_coordinator_with_a_deadline_is_told_where_its_clock_started(
    settings: OperatorSettings,
) -> None:
    def env(job: FLJob, role: ChildRole, since: float | None) -> dict[str, Any]:
        body = build_actor_deployment(job, NS, settings, spec_hash(job.spec), role, since)
        [container] = body["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in container["env"]}

    timed = make_job(activeDeadlineSeconds=3600)
    assert env(timed, ChildRole.coordinator, 1740830400.0)["FEDFLEET_ACTIVE_SINCE"] == "1740830400"
    assert "FEDFLEET_ACTIVE_SINCE" not in env(timed, ChildRole.selector, 1740830400.0)
    assert "FEDFLEET_ACTIVE_SINCE" not in env(make_job(), ChildRole.coordinator, 1740830400.0)
    # A deadline is policy the coordinator reads at start: changing it rolls the actors, and
    # jobs without one keep the hash they always had.
    assert spec_hash(timed.spec) != spec_hash(make_job().spec)
    assert spec_hash(make_job(activeDeadlineSeconds=60).spec) != spec_hash(timed.spec)
    assert spec_hash(make_job(ttlSecondsAfterFinished=60).spec) == spec_hash(make_job().spec)
