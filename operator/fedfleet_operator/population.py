"""Pure builders of an FLPopulation's children, and of what it adds to its jobs' selectors.

An FLPopulation ``<name>`` is one URL and one enrollment secret for every FLJob whose
``spec.population`` is ``<name>`` in the same namespace (``operator/CONTRACT.md``,
"FLPopulation"). The operator gives it:

* the Secret ``<name>-enrollment`` (unless ``spec.enrollment.secretName`` names the user's
  own): the population secret, 32 random bytes as hex, created once and never rotated, and the
  enrollment token derived from it;
* the Deployment ``<name>-gateway`` (``spec.gateway.replicas`` pods of ``fedfleet population
  gateway``): the population's device API. It hands each check-in to one of the population's
  running jobs (the job selectors announce themselves in the store) and routes later calls by
  the ticket it handed out, so it keeps no state of its own: any replica serves any request.
  It reads the population secret (mounted as the selectors get it) and the store, whose
  password it takes from the Secret ``<name>-gateway``: a copy the population owns, as a job's
  Secret holds one for its actors, kept apart from the enrollment Secret (whose token is handed
  to whoever provisions devices) so that reading the token never reveals the store's password.
  With ``spec.gateway.tls`` it also mounts the user's ``kubernetes.io/tls`` Secret and serves
  https only (its probes too);
* the Service ``<name>-devices`` over the gateway pods, with no session affinity (routing is by
  ticket, not by connection);
* and, in each selector Deployment of such a job, :func:`with_population`: the population label
  and the population secret mounted read-only, with ``FEDFLEET_POPULATION_SECRET_FILE``
  pointing at it, so those selectors announce themselves to the gateway, enroll devices and
  verify the population's credentials the gateway forwards; and
  :func:`selector_population_patch`, the same additions as a patch of a job's existing selector
  Deployment, for the jobs created before their population.

Nothing here talks to the API (like :mod:`.builders`): the handlers send the bodies.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError

from fedfleet.core.population_spec import (
    ENROLL_TOKEN_KEY,
    POPULATION_NAME_MAX_LENGTH,
    POPULATION_NAME_PATTERN,
    POPULATION_SECRET_KEY,
    FLPopulationSpec,
    population_enroll_token,
)
from fedfleet.core.spec import DEFAULT_ACTOR_IMAGE
from fedfleet_operator.bodies import (
    Container,
    DeploymentBody,
    EnvVar,
    ObjectMeta,
    Probe,
    ResourceRequirements,
    SecretBody,
    ServiceBody,
    Volume,
    VolumeMount,
)
from fedfleet_operator.builders import (
    ACTOR_PORT,
    STARTUP_PROBE_FAILURES,
    http_probe,
    security_context,
)
from fedfleet_operator.naming import (
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_ROLE,
    MANAGED_BY,
    PREFIX,
    REDIS_PASSWORD_KEY,
    ChildRole,
    deployment_name,
)
from fedfleet_operator.settings import OperatorSettings

__all__ = [
    "GATEWAY_COMMAND",
    "GATEWAY_RESOURCES",
    "GATEWAY_TLS_MOUNT",
    "LABEL_POPULATION",
    "POPULATION_MOUNT",
    "POPULATION_PLURAL",
    "POPULATION_SECRET_ENV",
    "POPULATION_VOLUME",
    "SELECTOR_FS_GROUP",
    "InvalidPopulation",
    "PopulationRef",
    "active_jobs",
    "build_devices_service",
    "build_enrollment_secret",
    "build_gateway_deployment",
    "build_gateway_secret",
    "devices_service_name",
    "endpoint_url",
    "enrollment_secret_name",
    "gateway_name",
    "gateway_selector",
    "gateway_without_tls_patch",
    "population_from_body",
    "population_labels",
    "population_ref",
    "population_secret_from",
    "population_status",
    "selector_population_patch",
    "with_population",
]

POPULATION_PLURAL: Final = "flpopulations"
LABEL_POPULATION: Final = f"{PREFIX}/population"
"""Label of a population's children and pods: its gateway pods (which the devices' Service
selects, with role ``gateway``) and its jobs' selector pods."""
POPULATION_VOLUME: Final = "population-secret"
POPULATION_MOUNT: Final = "/var/run/fedfleet/population"
POPULATION_SECRET_ENV: Final = "FEDFLEET_POPULATION_SECRET_FILE"
SECRET_FILE_MODE: Final = 0o440
"""Read-only for the owner and the group. The Secret's files belong to root; the pod's
``fsGroup`` (the selectors' user, nobody) makes them the selector's to read. 0400 alone would
leave them unreadable to a non-root container (the kubelet turns it into 0440 under an
``fsGroup`` anyway)."""
SELECTOR_FS_GROUP: Final = 65534
TLS_VOLUME: Final = "gateway-tls"
GATEWAY_TLS_MOUNT: Final = "/var/run/fedfleet/tls"
TLS_CERT_KEY: Final = "tls.crt"
"""A ``kubernetes.io/tls`` Secret's certificate chain (what cert-manager writes)..."""
TLS_KEY_KEY: Final = "tls.key"
"""... and its private key."""
GATEWAY_COMMAND: Final = ("fedfleet", "population", "gateway")
GATEWAY_RESOURCES: Final[ResourceRequirements] = {"requests": {"cpu": "100m", "memory": "128Mi"}}
"""Of a gateway container without ``spec.gateway.resources``: the selectors' requests (it
relays the same calls), no limits (see :data:`fedfleet_operator.builders.DEFAULT_RESOURCES`)."""
_COMPONENT: Final = "population"
_DNS_1035: Final = re.compile(POPULATION_NAME_PATTERN)
_FINISHED: Final = frozenset({"Succeeded", "Failed"})


class InvalidPopulation(ValueError):
    """An FLPopulation the operator cannot serve; the message names the field."""


def devices_service_name(population: str) -> str:
    return f"{population}-devices"


def enrollment_secret_name(population: str) -> str:
    """The Secret the operator creates when ``spec.enrollment.secretName`` is left out."""
    return f"{population}-enrollment"


def gateway_name(population: str) -> str:
    """The gateway's Deployment, and the Secret holding its copy of the store's password."""
    return f"{population}-gateway"


def gateway_selector(population: str) -> dict[str, str]:
    """The labels the gateway Deployment and the devices' Service select the gateway pods by
    (a job's selector pods carry the population label too, with role ``selector``)."""
    return {LABEL_POPULATION: population, LABEL_ROLE: ChildRole.gateway.value}


def endpoint_url(population: str, namespace: str, port: int, *, tls: bool = False) -> str:
    """The in-cluster URL of the population's Service (``status.endpoint``): https when the
    gateway serves TLS (``spec.gateway.tls``)."""
    scheme = "https" if tls else "http"
    return f"{scheme}://{devices_service_name(population)}.{namespace}.svc:{port}"


def population_labels(population: str) -> dict[str, str]:
    """Labels of the FLPopulation's own children (no ``fedfleet.dev/job``: no job owns them)."""
    return {
        LABEL_NAME: "fedfleet",
        LABEL_INSTANCE: population,
        LABEL_COMPONENT: _COMPONENT,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_POPULATION: population,
    }


def _meta(name: str, namespace: str, population: str) -> ObjectMeta:
    return {"name": name, "namespace": namespace, "labels": population_labels(population)}


def population_from_body(name: str, spec: Mapping[str, Any]) -> FLPopulationSpec:
    """The validated spec of an FLPopulation; :class:`InvalidPopulation` naming the field."""
    if len(name) > POPULATION_NAME_MAX_LENGTH or not _DNS_1035.match(name):
        raise InvalidPopulation(
            f"metadata.name: {name!r} must be a DNS-1035 label of at most "
            f"{POPULATION_NAME_MAX_LENGTH} characters, as '<name>-devices' names a Service"
        )
    try:
        # Strict JSON mode, as FLJobs are read: "8080" is not a port number.
        return FLPopulationSpec.model_validate_json(json.dumps(dict(spec)), strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            "spec." + ".".join(str(p) for p in err["loc"]) + ": " + err["msg"]
            for err in exc.errors()
        )
        raise InvalidPopulation(problems) from None


def population_secret_from(data: Mapping[str, str] | None) -> bytes | None:
    """The population secret held in a Secret's (decoded) data, if it is usable: hex of at
    least 16 bytes under ``population-secret``."""
    value = (data or {}).get(POPULATION_SECRET_KEY, "").strip()
    try:
        secret = bytes.fromhex(value)
    except ValueError:
        return None
    return secret if len(secret) >= 16 else None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def build_enrollment_secret(population: str, namespace: str, secret: bytes) -> SecretBody:
    """``<name>-enrollment``: the population secret (hex) and the enrollment token."""
    token = population_enroll_token(secret)  # refuses a secret under 16 bytes
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(enrollment_secret_name(population), namespace, population),
        "type": "Opaque",
        "data": {POPULATION_SECRET_KEY: _b64(secret.hex()), ENROLL_TOKEN_KEY: _b64(token)},
    }


def build_devices_service(population: str, namespace: str, spec: FLPopulationSpec) -> ServiceBody:
    """``<name>-devices``: the one URL of the population, over its gateway pods.

    ``sessionAffinity: None`` is written out, not left out: a Service made by an operator of
    the selector era has ``ClientIP``, and a strategic-merge patch keeps what the body omits."""
    meta = _meta(devices_service_name(population), namespace, population)
    if spec.service.annotations:
        meta["annotations"] = dict(spec.service.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": spec.service.type.value,
            "selector": gateway_selector(population),
            "ports": [
                {
                    "name": "http",
                    "port": spec.service.port,
                    "targetPort": ACTOR_PORT,
                    "protocol": "TCP",
                }
            ],
            "sessionAffinity": "None",
        },
    }


def build_gateway_secret(population: str, namespace: str, redis_password: str) -> SecretBody:
    """``<name>-gateway``: the store's password (key ``redis-password``), for the gateway's
    ``FEDFLEET_REDIS_PASSWORD`` (the operator's ``job_redis_password``, as jobs get it)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(gateway_name(population), namespace, population),
        "type": "Opaque",
        "data": {REDIS_PASSWORD_KEY: _b64(redis_password)},
    }


def _gateway_resources(spec: FLPopulationSpec) -> ResourceRequirements:
    own = spec.gateway.resources
    if own is None:
        return copy.deepcopy(GATEWAY_RESOURCES)
    out: ResourceRequirements = {}
    requests, limits = (q.model_dump(exclude_none=True) for q in (own.requests, own.limits))
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _gateway_env(population: str, settings: OperatorSettings, tls: bool) -> list[EnvVar]:
    # POD_IP before FEDFLEET_HOST, which expands it (as in the actors' env).
    served: list[EnvVar] = [
        {"name": "FEDFLEET_TLS_CERT_FILE", "value": f"{GATEWAY_TLS_MOUNT}/{TLS_CERT_KEY}"},
        {"name": "FEDFLEET_TLS_KEY_FILE", "value": f"{GATEWAY_TLS_MOUNT}/{TLS_KEY_KEY}"},
    ]
    return [
        {"name": "FEDFLEET_POPULATION", "value": population},
        {"name": POPULATION_SECRET_ENV, "value": f"{POPULATION_MOUNT}/{POPULATION_SECRET_KEY}"},
        {"name": "FEDFLEET_STORE_URL", "value": settings.actor_store_url},
        {
            "name": "FEDFLEET_REDIS_PASSWORD",
            "valueFrom": {
                "secretKeyRef": {"name": gateway_name(population), "key": REDIS_PASSWORD_KEY}
            },
        },
        {"name": "FEDFLEET_ACTOR_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "FEDFLEET_HOST", "value": "$(POD_IP)"},
        {"name": "FEDFLEET_PORT", "value": str(ACTOR_PORT)},
        {"name": "FEDFLEET_TICK_SECONDS", "value": f"{settings.actor_tick_seconds:g}"},
        *(served if tls else []),
    ]


def _gateway_probe(path: str, period: int, failures: int, tls: bool) -> Probe:
    probe = http_probe(path, period=period, failures=failures)
    if tls:  # the gateway serves https only: an http probe would never succeed
        probe["httpGet"]["scheme"] = "HTTPS"
    return probe


def _tls_volume(secret_name: str) -> Volume:
    """The user's ``kubernetes.io/tls`` Secret, both files read-only as the population
    secret is (0440, the pod's ``fsGroup`` making them the gateway's to read)."""
    return {
        "name": TLS_VOLUME,
        "secret": {
            "secretName": secret_name,
            "defaultMode": SECRET_FILE_MODE,
            "items": [{"key": k, "path": k} for k in (TLS_CERT_KEY, TLS_KEY_KEY)],
        },
    }


def _population_mount() -> VolumeMount:
    return {"name": POPULATION_VOLUME, "mountPath": POPULATION_MOUNT, "readOnly": True}


def _population_env() -> EnvVar:
    return {"name": POPULATION_SECRET_ENV, "value": f"{POPULATION_MOUNT}/{POPULATION_SECRET_KEY}"}


def _population_secret_volume(secret_name: str) -> Volume:
    return {
        "name": POPULATION_VOLUME,
        "secret": {
            "secretName": secret_name,
            "defaultMode": SECRET_FILE_MODE,
            "items": [{"key": POPULATION_SECRET_KEY, "path": POPULATION_SECRET_KEY}],
        },
    }


def build_gateway_deployment(
    population: str, namespace: str, spec: FLPopulationSpec, settings: OperatorSettings
) -> DeploymentBody:
    """``<name>-gateway``: ``spec.gateway.replicas`` pods of ``fedfleet population gateway``
    on the services image, hardened as the actors are (nobody, read-only root, no privilege
    escalation, no capabilities, no service-account token), with the population secret mounted
    as the selectors get it and the store's password from ``<name>-gateway``; with
    ``spec.gateway.tls``, the certificate's Secret mounted too and https probes."""
    pod_labels = {**population_labels(population), LABEL_ROLE: ChildRole.gateway.value}
    tls = spec.gateway.tls
    mounts: list[VolumeMount] = [{"name": "tmp", "mountPath": "/tmp"}, _population_mount()]
    volumes: list[Volume] = [
        {"name": "tmp", "emptyDir": {}},
        _population_secret_volume(
            spec.enrollment.secret_name or enrollment_secret_name(population)
        ),
    ]
    if tls is not None:
        mounts.append({"name": TLS_VOLUME, "mountPath": GATEWAY_TLS_MOUNT, "readOnly": True})
        volumes.append(_tls_volume(tls.secret_name))
    container: Container = {
        "name": ChildRole.gateway.value,
        "image": settings.actor_image or DEFAULT_ACTOR_IMAGE,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(GATEWAY_COMMAND),
        "env": _gateway_env(population, settings, tls is not None),
        "ports": [{"name": "http", "containerPort": ACTOR_PORT, "protocol": "TCP"}],
        "startupProbe": _gateway_probe("/healthz", 2, STARTUP_PROBE_FAILURES, tls is not None),
        "readinessProbe": _gateway_probe("/readyz", 2, 3, tls is not None),
        "livenessProbe": _gateway_probe("/healthz", 10, 3, tls is not None),
        "securityContext": security_context(),
        "resources": _gateway_resources(spec),
        "volumeMounts": mounts,
    }
    meta = _meta(gateway_name(population), namespace, population)
    meta["labels"] = dict(pod_labels)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.gateway.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": gateway_selector(population)},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"fsGroup": SELECTOR_FS_GROUP},
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def gateway_without_tls_patch(population: str, namespace: str) -> dict[str, Any]:
    """A strategic-merge patch taking what ``spec.gateway.tls`` added off the gateway
    Deployment: the TLS env, volume and mount deleted (``$patch: delete``; a no-op when they are
    not there) and the probes' scheme back to HTTP (the API server's default, so a gateway that
    never had TLS does not change). Sent after the gateway's body when the spec has no TLS,
    because a patch to the plain body alone would keep them: the gateway would go on serving
    https under an ``http://`` endpoint."""
    probe = {"httpGet": {"scheme": "HTTP"}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": gateway_name(population), "namespace": namespace},
        "spec": {
            "template": {
                "spec": {
                    "volumes": [{"name": TLS_VOLUME, "$patch": "delete"}],
                    "containers": [
                        {
                            "name": ChildRole.gateway.value,
                            "env": [
                                {"name": name, "$patch": "delete"}
                                for name in ("FEDFLEET_TLS_CERT_FILE", "FEDFLEET_TLS_KEY_FILE")
                            ],
                            "volumeMounts": [{"mountPath": GATEWAY_TLS_MOUNT, "$patch": "delete"}],
                            "startupProbe": probe,
                            "readinessProbe": probe,
                            "livenessProbe": probe,
                        }
                    ],
                }
            }
        },
    }


def active_jobs(population: str, fljobs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of the FLJobs of ``population`` (from a list of one namespace's) not finished."""
    names = set()
    for job in fljobs:
        spec, status = job.get("spec") or {}, job.get("status") or {}
        if spec.get("population") != population or status.get("phase") in _FINISHED:
            continue
        names.add(str((job.get("metadata") or {}).get("name")))
    return sorted(names)


def population_status(
    population: str,
    namespace: str,
    spec: FLPopulationSpec,
    jobs: list[str],
    generation: int | None = None,
) -> dict[str, Any]:
    """``status`` of an FLPopulation: where devices connect, the Secret, the live jobs."""
    status: dict[str, Any] = {
        "endpoint": endpoint_url(
            population, namespace, spec.service.port, tls=spec.gateway.tls is not None
        ),
        "enrollmentSecret": spec.enrollment.secret_name or enrollment_secret_name(population),
        "jobs": list(jobs),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


@dataclass(frozen=True, slots=True)
class PopulationRef:
    """What a job's selectors need of their FLPopulation: its name and its Secret."""

    name: str
    secret_name: str


def population_ref(obj: Mapping[str, Any]) -> PopulationRef | None:
    """The FLPopulation object (as read from the API) as a :class:`PopulationRef`; None when
    it is being deleted or its spec cannot be served."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    name = str(meta.get("name", ""))
    try:
        spec = population_from_body(name, obj.get("spec") or {})
    except InvalidPopulation:
        return None
    return PopulationRef(name, spec.enrollment.secret_name or enrollment_secret_name(name))


def with_population(deployment: DeploymentBody, ref: PopulationRef) -> DeploymentBody:
    """A selector Deployment that serves the population ``ref``: its pods labelled
    ``fedfleet.dev/population``, the population secret mounted read-only, and
    ``FEDFLEET_POPULATION_SECRET_FILE`` naming the file (the selector then announces itself to
    the population's gateway and verifies the device credentials the gateway forwards). The
    Deployment's own selector is untouched (it is immutable)."""
    out = copy.deepcopy(deployment)
    template = out["spec"]["template"]
    template["metadata"]["labels"][LABEL_POPULATION] = ref.name
    pod = template["spec"]
    pod["securityContext"] = {"fsGroup": SELECTOR_FS_GROUP}
    pod["volumes"].append(_population_secret_volume(ref.secret_name))
    for container in pod["containers"]:
        container["volumeMounts"].append(_population_mount())
        container["env"].append(_population_env())
    return out


def selector_population_patch(job: str, namespace: str, ref: PopulationRef) -> dict[str, Any]:
    """A strategic-merge patch of the job's existing selector Deployment that makes it what
    :func:`with_population` builds: the label, the pod's ``fsGroup``, the secret's volume and
    the container's mount and env (merged by name and mount path, so patching twice changes
    nothing). The operator sends it to the selectors of the jobs already running when their
    FLPopulation is created, so they join its gateway without waiting for a spec change."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(job, ChildRole.selector), "namespace": namespace},
        "spec": {
            "template": {
                "metadata": {"labels": {LABEL_POPULATION: ref.name}},
                "spec": {
                    "securityContext": {"fsGroup": SELECTOR_FS_GROUP},
                    "volumes": [_population_secret_volume(ref.secret_name)],
                    "containers": [
                        {
                            "name": ChildRole.selector.value,
                            "volumeMounts": [_population_mount()],
                            "env": [_population_env()],
                        }
                    ],
                },
            }
        },
    }
