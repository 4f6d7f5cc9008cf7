"""Pure builders of an FLJob's children: a validated job in, Kubernetes bodies out.

Nothing here talks to the API (dask-kubernetes' split): the handlers call these and send the
result, so every name, label, env var, probe and replica count of ``operator/CONTRACT.md`` is
unit-tested without a cluster. Owner references are not set here: the handler adds them with
:func:`kopf.adopt`, which needs the live object's uid.

Policy changes (round policy, aggregation, eligibility, plan) reach the actors through the plan
ConfigMap, which they read only at start; the :func:`spec_hash` annotation on the pod templates
is what restarts them. It is put on every actor Deployment, not only the coordinator's: the
selectors hand out the plan and apply eligibility, the aggregators apply the server optimizer,
so rolling the coordinator alone would leave those parts of a policy change unapplied.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from typing import Final

import yaml

from fedfleet.core.spec import API_VERSION, DEFAULT_ACTOR_IMAGE, KIND, FLJob, FLJobSpec
from fedfleet_operator.bodies import (
    ConfigMapBody,
    Container,
    DeploymentBody,
    EnvVar,
    ObjectMeta,
    Probe,
    ResourceRequirements,
    SecretBody,
    SecurityContext,
    ServiceBody,
    Volume,
    VolumeMount,
)
from fedfleet_operator.naming import (
    ANNOTATION_SPEC_HASH,
    JOB_SECRET_KEY,
    MANIFEST_KEY,
    REDIS_PASSWORD_KEY,
    ChildRole,
    deployment_name,
    labels,
    plan_name,
    secret_name,
    selector_labels,
    service_name,
)
from fedfleet_operator.settings import OperatorSettings

__all__ = [
    "ACTOR_PORT",
    "ACTOR_ROLES",
    "COORDINATOR_REPLICAS",
    "DEFAULT_RESOURCES",
    "actor_image",
    "actor_replicas",
    "build_actor_deployment",
    "build_aggregator_deployment",
    "build_coordinator_deployment",
    "build_job_secret",
    "build_plan_configmap",
    "build_selector_deployment",
    "build_selector_service",
    "http_probe",
    "is_job_secret",
    "manifest_yaml",
    "security_context",
    "spec_hash",
]

ACTOR_PORT: Final = 8080
"""Port of every actor's HTTP server (device API, health, metrics)."""
COORDINATOR_REPLICAS: Final = 2
"""An active coordinator and a standby that takes over when its lease lapses."""
ACTOR_ROLES: Final = (ChildRole.coordinator, ChildRole.selector, ChildRole.aggregator)

DEFAULT_RESOURCES: Final[dict[ChildRole, ResourceRequirements]] = {
    ChildRole.coordinator: {"requests": {"cpu": "50m", "memory": "128Mi"}},
    ChildRole.selector: {"requests": {"cpu": "100m", "memory": "128Mi"}},
    ChildRole.aggregator: {"requests": {"cpu": "250m", "memory": "256Mi"}},
}
"""Requests only, no limits: they place pods sensibly, while the memory an aggregator needs
grows with the model (``aggregation.maxUpdateBytes`` is up to 1 GiB), so a fixed limit would
OOM-kill large jobs. Clusters that want limits set them with a LimitRange."""


def security_context() -> SecurityContext:
    """Non-root (nobody), read-only root filesystem, no privilege escalation, no
    capabilities: actors need none of them. A fresh dict per body, so bodies never share
    mutable parts."""
    return {
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


_TMP_VOLUME: Final = "tmp"
"""An emptyDir at /tmp: the root filesystem is read-only, and Python libraries that need a
scratch file (tempfile, caches) look there."""

_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")


# -- policy hash ------------------------------------------------------------------------------


def spec_hash(spec: FLJobSpec) -> str:
    """sha256 of the canonical JSON of the parts of the spec actors apply per round.

    Round policy, aggregation, eligibility and plan: a change to any of them must restart the
    actors (they read the manifest at start). Sizing (``actors``), ``suspend`` and the
    simulated ``fleet`` are left out, so resizing or suspending never rolls a pod.
    """
    policy = {
        part: getattr(spec, part).model_dump(mode="json", by_alias=True)
        for part in ("rounds", "aggregation", "eligibility", "plan")
    }
    if spec.active_deadline_seconds is not None:
        # Only when set, so that jobs without a deadline keep the hash they always had.
        policy["activeDeadlineSeconds"] = {"seconds": spec.active_deadline_seconds}
    canonical = json.dumps(policy, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- plan ConfigMap and Secret ------------------------------------------------------------------


def _meta(name: str, namespace: str, job: str, role: ChildRole) -> ObjectMeta:
    return {"name": name, "namespace": namespace, "labels": labels(job, role)}


def manifest_yaml(job: FLJob, namespace: str) -> str:
    """The manifest actors read (``FEDFLEET_MANIFEST_YAML``): name, namespace and the
    validated spec with every default filled in, so all actors agree on it."""
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.name, "namespace": namespace},
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def build_plan_configmap(job: FLJob, namespace: str) -> ConfigMapBody:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(plan_name(job.name), namespace, job.name, ChildRole.plan),
        "data": {MANIFEST_KEY: manifest_yaml(job, namespace)},
    }


def is_job_secret(value: str | None) -> bool:
    """Whether a value is a usable job secret: 32 random bytes as 64 lower-case hex digits."""
    return value is not None and bool(_HEX64.match(value))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def build_job_secret(
    name: str, namespace: str, job_secret_hex: str, redis_password: str
) -> SecretBody:
    """The job's Secret. ``job_secret_hex`` is created once (by the handler) and kept."""
    if not is_job_secret(job_secret_hex):
        raise ValueError("job secret must be 64 lower-case hex characters")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(secret_name(name), namespace, name, ChildRole.plan),
        "type": "Opaque",
        "data": {JOB_SECRET_KEY: _b64(job_secret_hex), REDIS_PASSWORD_KEY: _b64(redis_password)},
    }


# -- actor Deployments and the selectors' Service -------------------------------------------------


def actor_replicas(spec: FLJobSpec, role: ChildRole, aggregators: int | None = None) -> int:
    """Replicas of a role's Deployment: zero for every role while the job is suspended.

    ``aggregators`` is the pool the operator sized while the job ran (``status.aggregators``),
    kept across spec changes and restarts (at least ``minAggregators``); without it the pool
    starts at ``ActorsSpec.aggregator_count``."""
    if spec.suspend:
        return 0
    if role is ChildRole.coordinator:
        return COORDINATOR_REPLICAS
    if role is ChildRole.selector:
        return spec.actors.selectors
    if role is ChildRole.aggregator:
        if aggregators is not None and aggregators > 0:
            return max(spec.actors.min_aggregators, aggregators)
        return spec.actors.aggregator_count(spec.rounds)
    raise ValueError(f"{role} is not an actor role")


def _seconds(value: float) -> str:
    return f"{value:g}"


def _actor_env(job: str, settings: OperatorSettings) -> list[EnvVar]:
    # POD_IP comes before the variables that expand $(POD_IP): Kubernetes expands only
    # references to variables defined earlier in the list.
    return [
        {
            "name": "FEDFLEET_MANIFEST_YAML",
            "valueFrom": {"configMapKeyRef": {"name": plan_name(job), "key": MANIFEST_KEY}},
        },
        {
            "name": "FEDFLEET_JOB_SECRET",
            "valueFrom": {"secretKeyRef": {"name": secret_name(job), "key": JOB_SECRET_KEY}},
        },
        {
            "name": "FEDFLEET_REDIS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": secret_name(job), "key": REDIS_PASSWORD_KEY}},
        },
        {"name": "FEDFLEET_STORE_URL", "value": settings.actor_store_url},
        {"name": "FEDFLEET_ACTOR_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "FEDFLEET_HOST", "value": "$(POD_IP)"},
        {"name": "FEDFLEET_PORT", "value": str(ACTOR_PORT)},
        {"name": "FEDFLEET_ADVERTISE", "value": f"http://$(POD_IP):{ACTOR_PORT}"},
        {"name": "FEDFLEET_TICK_SECONDS", "value": _seconds(settings.actor_tick_seconds)},
        {"name": "FEDFLEET_LEASE_TTL", "value": _seconds(settings.lease_ttl)},
    ]


STARTUP_PROBE_FAILURES = 90
"""Start-up probe failures tolerated, 2 s apart: an actor has 3 minutes to come up."""


def http_probe(path: str, period: int, failures: int) -> Probe:
    return {
        "httpGet": {"path": path, "port": ACTOR_PORT},
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    }


def _deadline_env(job: FLJob, role: ChildRole, active_since: float | None) -> list[EnvVar]:
    """``FEDFLEET_ACTIVE_SINCE`` for the coordinator of a job with a deadline: where
    ``spec.activeDeadlineSeconds`` counts from (``status.startTime``, reset on resume)."""
    if role is not ChildRole.coordinator or job.spec.active_deadline_seconds is None:
        return []
    if active_since is None:
        return []
    return [{"name": "FEDFLEET_ACTIVE_SINCE", "value": str(int(active_since))}]


_MODELS_VOLUME = "models"
MODEL_STORAGE_ROLES: Final = (ChildRole.selector, ChildRole.aggregator)
"""The actors that read or write stored models (spec.checkpoints.storage)."""


def _storage_env(job: FLJob, role: ChildRole) -> list[EnvVar]:
    """S3 credentials from the Secret ``spec.checkpoints.storage.credentialsSecret`` names."""
    storage = job.spec.checkpoints.storage
    if role not in MODEL_STORAGE_ROLES or storage.credentials_secret is None:
        return []
    return [
        {
            "name": env,
            "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}},
        }
        for env, key in (
            ("AWS_ACCESS_KEY_ID", "accessKeyId"),
            ("AWS_SECRET_ACCESS_KEY", "secretAccessKey"),
        )
    ]


def _storage_volume(job: FLJob, role: ChildRole) -> list[Volume]:
    """The PVC ``spec.checkpoints.storage.claimName`` names, for the actors that need it."""
    claim = job.spec.checkpoints.storage.claim_name
    if role not in MODEL_STORAGE_ROLES or claim is None:
        return []
    return [{"name": _MODELS_VOLUME, "persistentVolumeClaim": {"claimName": claim}}]


def _storage_mount(job: FLJob, role: ChildRole) -> list[VolumeMount]:
    storage = job.spec.checkpoints.storage
    if not _storage_volume(job, role) or storage.path is None:
        return []
    return [{"name": _MODELS_VOLUME, "mountPath": storage.path}]


def actor_image(job: FLJob, settings: OperatorSettings) -> str:
    """The job's own image (``spec.actors.image``: a task image built on the services image)
    wins; then the operator's ``FEDFLEET_ACTOR_IMAGE``; then this release's services image.

    A job naming exactly the release's services image counts as naming none: FLJobs created
    before the field became optional carry it as the old CRD's default, and must keep following
    the operator's image as they did."""
    own = job.spec.actors.image
    if own is not None and own != DEFAULT_ACTOR_IMAGE:
        return own
    return settings.actor_image or DEFAULT_ACTOR_IMAGE


def _volume_mounts(job: FLJob) -> list[VolumeMount]:
    mounts: list[VolumeMount] = [{"name": _TMP_VOLUME, "mountPath": "/tmp"}]
    for v in job.spec.actors.volumes:
        mounts.append({"name": v.name, "mountPath": v.mount_path, "readOnly": True})
    return mounts


def _volumes(job: FLJob) -> list[Volume]:
    """The scratch ``/tmp`` and the FLJob's ``spec.actors.volumes`` (read-only)."""
    volumes: list[Volume] = [{"name": _TMP_VOLUME, "emptyDir": {}}]
    for v in job.spec.actors.volumes:
        if v.config_map is not None:
            volumes.append({"name": v.name, "configMap": {"name": v.config_map}})
        elif v.persistent_volume_claim is not None:
            volumes.append(
                {
                    "name": v.name,
                    "persistentVolumeClaim": {
                        "claimName": v.persistent_volume_claim,
                        "readOnly": True,
                    },
                }
            )
    return volumes


def _container(
    job: FLJob, role: ChildRole, settings: OperatorSettings, active_since: float | None = None
) -> Container:
    return {
        "name": role.value,
        "image": actor_image(job, settings),
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["fedfleet", role.value],
        "env": _actor_env(job.name, settings)
        + _deadline_env(job, role, active_since)
        + _storage_env(job, role),
        "ports": [{"name": "http", "containerPort": ACTOR_PORT, "protocol": "TCP"}],
        # Start-up (imports, the first store round trip) can take far longer than liveness
        # allows on a busy node; until /healthz first answers, liveness does not count.
        "startupProbe": http_probe("/healthz", period=2, failures=STARTUP_PROBE_FAILURES),
        "readinessProbe": http_probe("/readyz", period=2, failures=3),
        "livenessProbe": http_probe("/healthz", period=10, failures=3),
        "securityContext": security_context(),
        "resources": copy.deepcopy(DEFAULT_RESOURCES[role]),
        "volumeMounts": [*_volume_mounts(job), *_storage_mount(job, role)],
    }


def build_actor_deployment(
    job: FLJob,
    namespace: str,
    settings: OperatorSettings,
    spec_hash: str,
    role: ChildRole,
    active_since: float | None = None,
    aggregators: int | None = None,
) -> DeploymentBody:
    """The Deployment of one actor role (see the role-named wrappers below); ``active_since``
    (Unix seconds) is where the coordinator counts ``spec.activeDeadlineSeconds`` from;
    ``aggregators`` the pool's current size (:func:`actor_replicas`)."""
    if role not in ACTOR_ROLES:
        raise ValueError(f"{role} is not an actor role")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(deployment_name(job.name, role), namespace, job.name, role),
        "spec": {
            "replicas": actor_replicas(job.spec, role, aggregators),
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(job.name, role)},
            "template": {
                "metadata": {
                    "labels": labels(job.name, role),
                    "annotations": {ANNOTATION_SPEC_HASH: spec_hash},
                },
                "spec": {
                    # Actors never call the Kubernetes API: no token in their pods.
                    "automountServiceAccountToken": False,
                    "containers": [_container(job, role, settings, active_since)],
                    "volumes": [*_volumes(job), *_storage_volume(job, role)],
                },
            },
        },
    }


def build_coordinator_deployment(
    job: FLJob, namespace: str, settings: OperatorSettings, spec_hash: str
) -> DeploymentBody:
    """Two coordinators (active + standby); zero while suspended."""
    return build_actor_deployment(job, namespace, settings, spec_hash, ChildRole.coordinator)


def build_selector_deployment(
    job: FLJob, namespace: str, settings: OperatorSettings, spec_hash: str
) -> DeploymentBody:
    """``spec.actors.selectors`` selectors; zero while suspended."""
    return build_actor_deployment(job, namespace, settings, spec_hash, ChildRole.selector)


def build_aggregator_deployment(
    job: FLJob, namespace: str, settings: OperatorSettings, spec_hash: str
) -> DeploymentBody:
    """``ActorsSpec.aggregator_count(rounds)`` aggregators; zero while suspended."""
    return build_actor_deployment(job, namespace, settings, spec_hash, ChildRole.aggregator)


def build_selector_service(job: FLJob, namespace: str) -> ServiceBody:
    """The device API: a ClusterIP Service over the selectors, port 8080 ``http``.

    ``sessionAffinity: ClientIP``: the selector that selected a device holds the selection in
    its memory until the round is configured, so the device's plan poll must reach that
    selector again, over whatever new connection it opens; per-connection balancing would
    send some polls to another selector, which answers 404 (no selection held). Reports are
    checked statelessly and any selector forwards them. A population's devices go through
    its gateway instead, which routes by the ticket."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service_name(job.name), namespace, job.name, ChildRole.selector),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(job.name, ChildRole.selector),
            "ports": [
                {"name": "http", "port": ACTOR_PORT, "targetPort": ACTOR_PORT, "protocol": "TCP"}
            ],
            "sessionAffinity": "ClientIP",
        },
    }
