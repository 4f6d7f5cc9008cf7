"""The FLPopulation spec: one device population's endpoint on Kubernetes.

Devices are configured once, with a URL and a population name (Bonawitz et al. 2019, section 3),
and jobs of that population come and go behind the URL. On Kubernetes an ``FLPopulation``
(``fedfleet.dev/v1alpha1``) names that endpoint: the operator gives it a Service over the
population's gateway (``fedfleet population gateway``, which hands each device's check-in to one
of the population's running jobs), and the Secret the population's enrollment token and device
credentials derive from. The CRD's schema is generated from these models
(:mod:`fedfleet.crdgen_population`), as the FLJob's is from :mod:`fedfleet.core.spec`.

Also here, because the operator may not import the selector's modules: the derivation of the
enrollment token from the population secret, identical to
``fedfleet.service.enrollment.enroll_token`` (a unit test holds them equal).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from decimal import Decimal
from enum import StrEnum
from typing import Final, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "DEFAULT_DEVICE_PORT",
    "ENROLL_TOKEN_KEY",
    "POPULATION_KIND",
    "POPULATION_NAME_MAX_LENGTH",
    "POPULATION_NAME_PATTERN",
    "POPULATION_SECRET_KEY",
    "SECRET_NAME_PATTERN",
    "EnrollmentSpec",
    "FLPopulationSpec",
    "GatewayResources",
    "GatewaySpec",
    "GatewayTLS",
    "Quantities",
    "ServiceSpec",
    "ServiceType",
    "parse_quantity",
    "population_enroll_token",
]

POPULATION_KIND: Final = "FLPopulation"
DEFAULT_DEVICE_PORT: Final = 8080
POPULATION_NAME_MAX_LENGTH: Final = 55
"""Longest FLPopulation name: its Service ``<name>-devices`` (and the labels naming it) must fit
a 63-character DNS label; ``<name>-gateway`` is as long."""
POPULATION_NAME_PATTERN: Final = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""A DNS-1035 label, as ``<name>-devices`` names a Service; also an FLJob's ``population``."""
SECRET_NAME_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""A DNS-1123 subdomain, as Kubernetes requires of a Secret's name."""
POPULATION_SECRET_KEY: Final = "population-secret"
"""Key of the enrollment Secret holding the population secret (hex)."""
ENROLL_TOKEN_KEY: Final = "enroll-token"
"""Key of the Secret the operator creates holding the derived enrollment token (hex)."""

QUANTITY_PATTERN: Final = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
"""A non-negative Kubernetes resource quantity (``100m``, ``128Mi``, ``1.5``, ``1e3``)."""
MAX_GATEWAY_REPLICAS: Final = 50

_ENROLL_LABEL: Final = b"fedfleet/population/enroll"
_MIN_SECRET_BYTES: Final = 16


def population_enroll_token(secret: bytes) -> str:
    """``hex(HMAC-SHA256(secret, "fedfleet/population/enroll"))``: the token that enrolls new
    devices of the population (docs/device-protocol.md, section 1.2)."""
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"the population secret must hold at least {_MIN_SECRET_BYTES} bytes")
    return hmac.new(secret, _ENROLL_LABEL, hashlib.sha256).hexdigest()


_QUANTITY: Final = re.compile(QUANTITY_PATTERN)
_SUFFIXES: Final = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
    **{f"{p}i": Decimal(1024 ** (i + 1)) for i, p in enumerate("KMGTPE")},
}


def parse_quantity(text: str) -> Decimal:
    """The value of a Kubernetes quantity (``250m`` -> 0.25, ``1Gi`` -> 1073741824);
    :class:`ValueError` for anything else."""
    if not _QUANTITY.match(text):
        raise ValueError(f"{text!r} is not a resource quantity (e.g. 100m, 0.5, 128Mi, 1G)")
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return Decimal(text)  # a plain number or an exponent form (1e3)


class _Spec(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )


class ServiceType(StrEnum):
    """How devices reach the population's Service."""

    cluster_ip = "ClusterIP"
    node_port = "NodePort"
    load_balancer = "LoadBalancer"


class ServiceSpec(_Spec):
    type: ServiceType = ServiceType.cluster_ip
    """Type of the Service `<name>-devices`: ClusterIP (devices in the cluster), NodePort, or
    LoadBalancer (devices outside the cluster: set `gateway.tls`, or put TLS in front of it)."""
    port: int = Field(DEFAULT_DEVICE_PORT, ge=1, le=65535)
    """Port of the Service; it forwards to the gateway pods' port 8080."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations of the Service (e.g. a cloud load balancer's settings)."""


class EnrollmentSpec(_Spec):
    secret_name: str | None = Field(None, min_length=1, max_length=253, pattern=SECRET_NAME_PATTERN)
    """An existing Secret in the namespace holding the population secret (hex) under key
    `population-secret`. Left out: the operator creates `<name>-enrollment` once, with 32
    random bytes and the enrollment token (key `enroll-token`), and never rotates it."""


class Quantities(_Spec):
    cpu: str | None = Field(None, max_length=32, pattern=QUANTITY_PATTERN)
    """CPU, a Kubernetes quantity (e.g. `100m`, `0.5`, `2`)."""
    memory: str | None = Field(None, max_length=32, pattern=QUANTITY_PATTERN)
    """Memory, a Kubernetes quantity (e.g. `128Mi`, `1Gi`)."""


class GatewayResources(_Spec):
    requests: Quantities = Field(default_factory=Quantities)
    """What the scheduler reserves for each gateway pod."""
    limits: Quantities = Field(default_factory=Quantities)
    """The most each gateway pod may use; each at least its request."""

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> Self:
        for name in ("cpu", "memory"):
            request, limit = getattr(self.requests, name), getattr(self.limits, name)
            if request is not None and limit is not None:
                if parse_quantity(limit) < parse_quantity(request):
                    raise ValueError(
                        f"limits.{name} {limit} is less than requests.{name} {request}"
                    )
        return self


class GatewayTLS(_Spec):
    secret_name: str = Field(min_length=1, max_length=253, pattern=SECRET_NAME_PATTERN)
    """A `kubernetes.io/tls` Secret in the namespace (keys `tls.crt`, the PEM certificate
    chain, and `tls.key`, its private key), made by the user or cert-manager. The gateway then
    serves https only; devices trust its CA with `fedfleet device run --ca-file`."""


class GatewaySpec(_Spec):
    replicas: int = Field(1, ge=1, le=MAX_GATEWAY_REPLICAS)
    """Gateway pods behind the Service `<name>-devices`. Any replica serves any request (the
    tickets it hands out carry their route), so more replicas only add capacity."""
    resources: GatewayResources | None = None
    """Resources of each gateway container. Left out: requests cpu 100m, memory 128Mi, no
    limits (as the selectors')."""
    tls: GatewayTLS | None = None
    """Serve the devices https with this certificate (`status.endpoint` becomes `https://`).
    Left out: plain http, for a cluster network that is trusted or TLS terminated in front of
    the Service."""


class FLPopulationSpec(_Spec):
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    """The Service devices use: one URL for every job of the population."""
    enrollment: EnrollmentSpec = Field(default_factory=EnrollmentSpec)
    """Where the population secret comes from."""
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    """The gateway Deployment `<name>-gateway` that serves the Service: it hands each check-in
    to one of the population's running FLJobs (by `spec.scheduling`) and answers with a
    reconnect window when none runs."""
