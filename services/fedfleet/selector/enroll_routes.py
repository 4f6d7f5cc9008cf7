"""Enrollment on the selector: ``POST /v1/enroll`` and ``POST /v1/enroll/renew``.

A device enrolls once with its population's enroll token and gets its own credential
(:mod:`fedfleet.service.enrollment`); it renews the credential with the credential itself.
Both routes exist only on a selector that was given the population secret
(``--population-secret-file``); elsewhere they answer 404.

* ``/v1/enroll``: ``Authorization: Bearer <enroll token>`` and ``{"population": NAME}``
  (at most 1024 bytes, no other field). The **server picks the device id** (random), so an
  enroll token can add devices but never take an enrolled device's identity. 201 with the
  credential; 401 for a wrong token; 404 for another population; 429 (``Retry-After``) past
  the selector's enrollment rate (a token bucket, default 20/s with a burst of 100).
  Enrolling writes nothing to the store: the credential is the whole state.
* ``/v1/enroll/renew``: the device's credential and ``x-fedfleet-device``, no body. 200 with a
  new credential for the same device; 401 when the credential is expired, forged or revoked
  (read from the store, not the tick's view, so a revoked device cannot renew in between);
  renewals spend the device's check-in tokens.

Both are checked from the headers by the gate before any body is read.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from fedfleet.selector import contract
from fedfleet.selector.credentials import UNAUTHENTICATED, DeviceAuth
from fedfleet.selector.doors import ID
from fedfleet.selector.ratelimit import RateLimit, RateLimiter, retry_after
from fedfleet.service.enrollment import DEFAULT_TTL_S, PopulationKeys, new_device_id
from fedfleet.service.gate import Door, Refusal, Seen, bearer
from fedfleet.service.keys import JobKeys
from fedfleet.store.base import Store, StoreUnavailable

__all__ = [
    "ENROLL_LIMIT",
    "EnrollRequest",
    "Enrollment",
    "EnrollmentSettings",
    "add_enroll_routes",
    "device_auth",
    "enroll_doors",
]

ENROLL_LIMIT = 1024
"""Bytes of an enrollment body (``{"population": ...}`` is well under 300)."""
_NOT_ENABLED = Refusal(404, "enrollment is not enabled on this selector")
_ID = re.compile(ID)


@dataclass(frozen=True, slots=True)
class EnrollmentSettings:
    """How a selector with a population secret enrolls devices and limits them."""

    enroll_rate: RateLimit = field(default_factory=lambda: RateLimit(20.0, 100.0))
    """Enrollments per second for the whole selector, and the burst (default 20/s, 100)."""
    checkin_rate: RateLimit = field(default_factory=lambda: RateLimit(1.0, 5.0))
    """Check-ins (and renewals) per second per credential-authenticated device, and the
    burst (default once a second, 5)."""
    credential_ttl: int = DEFAULT_TTL_S
    """Lifetime of an issued credential in seconds (30 days); renew after half of it."""


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    population: str = Field(
        min_length=1, max_length=253, description="The population the device joins."
    )


class Enrollment(BaseModel):
    """A device's identity and credential (201 from enroll, 200 from renew)."""

    device_id: str = Field(description="Chosen by the server: `d-` and 24 hex characters.")
    population: str
    credential: str = Field(
        description="`v1.<payload>.<sig>`, at most 512 characters: send it as "
        "`Authorization: Bearer` with `x-fedfleet-device` on every device request."
    )
    issued_at: float = Field(description="Unix seconds.")
    expires_at: float = Field(description="Unix seconds; refused from then on.")
    renew_after: float = Field(description="Unix seconds: renew from then on (half-life).")


def device_auth(
    keys: JobKeys | None, population: str, secret: bytes | None, settings: EnrollmentSettings | None
) -> DeviceAuth:
    """The selector's credential checks: job tokens, and with ``secret`` the population's
    credentials (check-ins of those limited per device by ``settings.checkin_rate``)."""
    return DeviceAuth(
        keys,
        None if secret is None else PopulationKeys.from_secret(secret, population),
        checkin_limiter=RateLimiter((settings or EnrollmentSettings()).checkin_rate),
    )


def enroll_doors(auth: DeviceAuth, settings: EnrollmentSettings | None) -> list[Door]:
    """The gate's doors of the two routes (404 at the door when enrollment is off)."""
    keys = auth.population
    enroll_limiter = RateLimiter((settings or EnrollmentSettings()).enroll_rate)

    def enroll_check(seen: Seen) -> Refusal | None:
        if keys is None:
            return _NOT_ENABLED
        if not keys.enroll_ok(bearer(seen.headers)):
            return Refusal(401, "missing or invalid enroll token", {"WWW-Authenticate": "Bearer"})
        wait = enroll_limiter.take("enroll", time.time())
        if wait > 0:
            return Refusal(
                429, "too many enrollments; retry later", {"Retry-After": retry_after(wait)}
            )
        return None

    def renew_check(seen: Seen) -> Refusal | None:
        if keys is None:
            return _NOT_ENABLED
        device = seen.headers.get("x-fedfleet-device", "")
        if not _ID.match(device) or auth.credential(device, bearer(seen.headers)) is None:
            return UNAUTHENTICATED
        if auth.checkin_limiter is not None:
            wait = auth.checkin_limiter.take(device, time.time())
            if wait > 0:
                return Refusal(
                    429, "too many requests from this device", {"Retry-After": retry_after(wait)}
                )
        return None

    return [
        Door("POST", re.compile(r"/v1/enroll"), ENROLL_LIMIT, enroll_check),
        Door("POST", re.compile(r"/v1/enroll/renew"), 0, renew_check),
    ]


def add_enroll_routes(
    app: FastAPI, auth: DeviceAuth, store: Store, settings: EnrollmentSettings | None
) -> None:
    """Add the two routes (their doors come from :func:`enroll_doors`)."""
    ttl = (settings or EnrollmentSettings()).credential_ttl

    def population() -> PopulationKeys:
        if auth.population is None:  # the gate answered 404 already
            raise HTTPException(404, _NOT_ENABLED.detail)
        return auth.population

    @app.post(
        "/v1/enroll",
        status_code=201,
        response_model=Enrollment,
        responses=contract.ENROLL["responses"],
        openapi_extra=contract.ENROLL["openapi_extra"],
    )
    async def enroll(body: EnrollRequest) -> Any:
        """Enroll a new device of the population: the server picks its id."""
        keys = population()
        if body.population != keys.population:
            raise HTTPException(404, "unknown population")
        credential = keys.issue(new_device_id(), time.time(), ttl)
        return credential.enrollment()

    @app.post(
        "/v1/enroll/renew",
        response_model=Enrollment,
        responses=contract.RENEW["responses"],
        openapi_extra=contract.RENEW["openapi_extra"],
    )
    async def renew(request: Request) -> Any:
        """A new credential for the same device, in exchange for a valid one."""
        keys = population()
        device = request.headers.get("x-fedfleet-device", "")
        try:
            revoked = await run_in_threadpool(store.revoked_devices, keys.population)
        except StoreUnavailable:
            return JSONResponse(
                {"detail": "the shared store is unreachable; retry later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        if auth.credential(device, bearer(request.headers), revoked) is None:
            raise HTTPException(401, UNAUTHENTICATED.detail, {"WWW-Authenticate": "Bearer"})
        return keys.issue(device, time.time(), ttl).enrollment()
