"""Names and labels of an FLJob's children, in one place.

``operator/CONTRACT.md`` fixes them ("Children of FLJob"): the chart's NetworkPolicies, the
test cluster and ``kubectl`` users select pods by these labels, so builders, handlers and tests
all take them from here. Selectors use only ``fedfleet.dev/job`` and ``fedfleet.dev/role``:
those two never change for the life of a job, and a Deployment's selector is immutable.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final

__all__ = [
    "ANNOTATION_SPEC_HASH",
    "FINALIZER",
    "GROUP",
    "JOB_SECRET_KEY",
    "KIND",
    "LABEL_COMPONENT",
    "LABEL_INSTANCE",
    "LABEL_JOB",
    "LABEL_MANAGED_BY",
    "LABEL_NAME",
    "LABEL_ROLE",
    "MANAGED_BY",
    "MANIFEST_KEY",
    "MAX_JOB_NAME",
    "PLURAL",
    "PREFIX",
    "REDIS_PASSWORD_KEY",
    "VERSION",
    "ChildRole",
    "deployment_name",
    "job_key",
    "labels",
    "name_problem",
    "plan_name",
    "secret_name",
    "selector_labels",
    "service_name",
]

GROUP: Final = "fedfleet.dev"
VERSION: Final = "v1alpha1"
PLURAL: Final = "fljobs"
KIND: Final = "FLJob"

PREFIX: Final = "fedfleet.dev"
"""Prefix of the operator's annotations, labels and kopf's progress/diff-base annotations."""
FINALIZER: Final = f"{PREFIX}/cleanup"
"""The finalizer under which deleting an FLJob removes its keys from the store."""
ANNOTATION_SPEC_HASH: Final = f"{PREFIX}/spec-hash"
"""Pod-template annotation whose change rolls the actors when the job's policy changes."""

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_JOB: Final = f"{PREFIX}/job"
LABEL_ROLE: Final = f"{PREFIX}/role"
MANAGED_BY: Final = "fedfleet-operator"

MANIFEST_KEY: Final = "fljob.yaml"
"""Key of the plan ConfigMap holding the job's manifest."""
JOB_SECRET_KEY: Final = "job-secret"
"""Key of the job Secret holding the 64-hex-character job secret."""
REDIS_PASSWORD_KEY: Final = "redis-password"
"""Key of the job Secret holding the store's password."""


class ChildRole(StrEnum):
    """The ``fedfleet.dev/role`` of a child: an actor role, or ``plan`` for its configuration
    (the ConfigMap and the Secret); ``gateway`` is the role of an FLPopulation's gateway pods
    (no FLJob has one)."""

    coordinator = "coordinator"
    selector = "selector"
    aggregator = "aggregator"
    plan = "plan"
    gateway = "gateway"


_LONGEST_SUFFIX: Final = max(len(f"-{role.value}") for role in ChildRole)
MAX_JOB_NAME: Final = 63 - _LONGEST_SUFFIX
"""Longest FLJob name whose children's names still fit a 63-character DNS label (the
Service ``<name>-selector`` must be one) and whose name fits a label value."""

_DNS_1035: Final = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def name_problem(name: str) -> str | None:
    """Why an FLJob name cannot name its children, or ``None`` when it can.

    Kubernetes accepts FLJob names up to 253 characters with dots, but a Service name must be a
    DNS-1035 label (at most 63 characters, starting with a letter, no dots) and label values are
    at most 63 characters too.
    """
    if len(name) > MAX_JOB_NAME:
        return (
            f"metadata.name: {name!r} is {len(name)} characters; an FLJob name may have at most "
            f"{MAX_JOB_NAME} so that its children's names (e.g. '<name>-coordinator') fit 63"
        )
    if not _DNS_1035.match(name):
        return (
            f"metadata.name: {name!r} must be a DNS-1035 label (lower-case letters, digits and"
            " '-', starting with a letter, no dots) because it names a Service"
        )
    return None


def job_key(namespace: str, name: str) -> str:
    """The job's identity in the store, ``<namespace>/<name>`` (``FLJob.key``)."""
    return f"{namespace}/{name}"


def plan_name(job: str) -> str:
    return f"{job}-plan"


def secret_name(job: str) -> str:
    return f"{job}-secret"


def deployment_name(job: str, role: ChildRole) -> str:
    return f"{job}-{role.value}"


def service_name(job: str) -> str:
    """The selectors' Service: the device API."""
    return f"{job}-{ChildRole.selector.value}"


def selector_labels(job: str, role: ChildRole) -> dict[str, str]:
    """The labels a Deployment or Service selects its pods by."""
    return {LABEL_JOB: job, LABEL_ROLE: role.value}


def labels(job: str, role: ChildRole) -> dict[str, str]:
    """Every label of a child object and of its pod template."""
    return {
        LABEL_NAME: "fedfleet",
        LABEL_INSTANCE: job,
        LABEL_COMPONENT: role.value,
        LABEL_MANAGED_BY: MANAGED_BY,
        **selector_labels(job, role),
    }
