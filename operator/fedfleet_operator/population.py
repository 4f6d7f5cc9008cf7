"""Pure builders of an FLPopulation's children, and of what it adds to its jobs' selectors.

An FLPopulation ``<name>`` is one URL and one enrollment secret for every FLJob whose
``spec.population`` is ``<name>`` in the same namespace (``operator/CONTRACT.md``,
"FLPopulation"). The operator gives it:

* the Secret ``<name>-enrollment`` (unless ``spec.enrollment.secretName`` names the user's
  own): the population secret, 32 random bytes as hex, created once and never rotated, and the
  enrollment token derived from it;
* the Service ``<name>-devices`` over the selector pods labelled
  ``fedfleet.dev/population=<name>``, with ``sessionAffinity: ClientIP``: a selected device's
  plan poll, checkpoint download and report must reach the selector that selected it (the
  round's assignment and the device's long poll live in that selector), so a device sticks to
  one selector pod while that pod lives;
* and, in each selector Deployment of such a job, :func:`with_population`: the label the
  Service selects and the population secret mounted read-only, with
  ``FEDFLEET_POPULATION_SECRET_FILE`` pointing at it, so those selectors enroll devices and
  accept the population's credentials.

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
from fedfleet_operator.bodies import DeploymentBody, ObjectMeta, SecretBody, ServiceBody
from fedfleet_operator.builders import ACTOR_PORT
from fedfleet_operator.naming import (
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_ROLE,
    MANAGED_BY,
    PREFIX,
    ChildRole,
)

__all__ = [
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
    "devices_service_name",
    "endpoint_url",
    "enrollment_secret_name",
    "population_from_body",
    "population_labels",
    "population_ref",
    "population_secret_from",
    "population_status",
    "with_population",
]

POPULATION_PLURAL: Final = "flpopulations"
LABEL_POPULATION: Final = f"{PREFIX}/population"
"""Label of the selector pods that serve a population; the devices' Service selects it."""
POPULATION_VOLUME: Final = "population-secret"
POPULATION_MOUNT: Final = "/var/run/fedfleet/population"
POPULATION_SECRET_ENV: Final = "FEDFLEET_POPULATION_SECRET_FILE"
SECRET_FILE_MODE: Final = 0o440
"""Read-only for the owner and the group. The Secret's files belong to root; the pod's
``fsGroup`` (the selectors' user, nobody) makes them the selector's to read. 0400 alone would
leave them unreadable to a non-root container (the kubelet turns it into 0440 under an
``fsGroup`` anyway)."""
SELECTOR_FS_GROUP: Final = 65534
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


def endpoint_url(population: str, namespace: str, port: int) -> str:
    """The in-cluster URL of the population's Service (``status.endpoint``)."""
    return f"http://{devices_service_name(population)}.{namespace}.svc:{port}"


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
    """``<name>-devices``: the one URL of the population, over its jobs' selector pods."""
    meta = _meta(devices_service_name(population), namespace, population)
    if spec.service.annotations:
        meta["annotations"] = dict(spec.service.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": spec.service.type.value,
            "selector": {LABEL_POPULATION: population, LABEL_ROLE: ChildRole.selector.value},
            "ports": [
                {
                    "name": "http",
                    "port": spec.service.port,
                    "targetPort": ACTOR_PORT,
                    "protocol": "TCP",
                }
            ],
            "sessionAffinity": "ClientIP",
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
        "endpoint": endpoint_url(population, namespace, spec.service.port),
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
    ``fedfleet.dev/population`` (the devices' Service selects them), the population secret
    mounted read-only, and ``FEDFLEET_POPULATION_SECRET_FILE`` naming the file. The
    Deployment's own selector is untouched (it is immutable)."""
    out = copy.deepcopy(deployment)
    template = out["spec"]["template"]
    template["metadata"]["labels"][LABEL_POPULATION] = ref.name
    pod = template["spec"]
    pod["securityContext"] = {"fsGroup": SELECTOR_FS_GROUP}
    pod["volumes"].append(
        {
            "name": POPULATION_VOLUME,
            "secret": {
                "secretName": ref.secret_name,
                "defaultMode": SECRET_FILE_MODE,
                "items": [{"key": POPULATION_SECRET_KEY, "path": POPULATION_SECRET_KEY}],
            },
        }
    )
    for container in pod["containers"]:
        container["volumeMounts"].append(
            {"name": POPULATION_VOLUME, "mountPath": POPULATION_MOUNT, "readOnly": True}
        )
        container["env"].append(
            {"name": POPULATION_SECRET_ENV, "value": f"{POPULATION_MOUNT}/{POPULATION_SECRET_KEY}"}
        )
    return out
