"""Population enrollment and device credentials: the keys, the token format, the checks.

A job secret makes every new FLJob a new set of device tokens, and anyone holding it can mint a
token for any device id. Devices instead belong to a *population*, which has its own secret,
and from it two keys are derived (HMAC-SHA256 with a label, like :mod:`fedfleet.service.keys`):

* the **enroll token** (``HMAC(secret, "fedfleet/population/enroll")``, hex) is what an app or
  a device installer holds. It can only ask for a *new* device: the server picks the device id,
  so an enroll token in the wrong hands cannot impersonate an enrolled device;
* the **credential key** signs each device's **credential**: a signed, expiring token bound to
  one device id and the population, valid across every job of the population.

A credential's string form is ``v1.<payload>.<sig>``: ``payload`` is the unpadded base64url of
the compact, key-sorted JSON ``{"exp", "iat", "jti", "pop", "sub"}`` and ``sig`` the unpadded
base64url of ``HMAC-SHA256(credential_key, b"v1." + payload)``; at most
:data:`MAX_CREDENTIAL_CHARS` characters. It is valid when the signature matches, ``pop`` is the
population, ``sub`` is the device that presents it, ``iat - 60 <= now < exp`` and the device was
not revoked at or after ``iat``. See docs/device-protocol.md, "Enrollment and credentials".

Everything here is pure (no I/O, time passed in): the selector's routes and doors call it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from fedfleet.core.population_spec import population_enroll_token

__all__ = [
    "CLOCK_SKEW_S",
    "CREDENTIAL_VERSION",
    "DEFAULT_TTL_S",
    "MAX_CREDENTIAL_CHARS",
    "MIN_SECRET_BYTES",
    "Claims",
    "Credential",
    "PopulationKeys",
    "enroll_token",
    "new_device_id",
]

CREDENTIAL_VERSION = "v1"
MAX_CREDENTIAL_CHARS = 512
"""Longest credential string accepted (a real one is about 230 characters)."""
DEFAULT_TTL_S = 30 * 86_400
"""A credential's default lifetime: 30 days; the device renews it after half of it."""
CLOCK_SKEW_S = 60
"""A credential issued up to this many seconds in the future (a selector's clock ahead of
another's) is still accepted."""
MIN_SECRET_BYTES = 16

_CREDENTIAL_LABEL = b"fedfleet/population/credential"
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_JTI = re.compile(r"^[0-9a-f]{16}$")
_KEYS = frozenset({"sub", "pop", "iat", "exp", "jti"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    """Strict unpadded base64url: only the alphabet, and the one canonical encoding."""
    if not _B64URL.match(text) or len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _b64(data) == text else None


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid credential says: whose it is, for which population, and for how long."""

    device_id: str
    population: str
    issued_at: int
    """Unix seconds (``iat``)."""
    expires_at: int
    """Unix seconds (``exp``): the credential is refused from this instant on."""
    jti: str
    """16 hex characters, unique per credential."""

    @property
    def renew_after(self) -> float:
        """Half-way through the lifetime: when a device should renew."""
        return self.issued_at + (self.expires_at - self.issued_at) / 2

    def to_json(self) -> dict[str, Any]:
        return {
            "exp": self.expires_at,
            "iat": self.issued_at,
            "jti": self.jti,
            "pop": self.population,
            "sub": self.device_id,
        }


@dataclass(frozen=True, slots=True)
class Credential:
    """An issued credential: its string form and its claims."""

    token: str
    claims: Claims

    def enrollment(self) -> dict[str, Any]:
        """The JSON body ``POST /v1/enroll`` (201) and ``/v1/enroll/renew`` (200) answer."""
        c = self.claims
        return {
            "device_id": c.device_id,
            "population": c.population,
            "credential": self.token,
            "issued_at": float(c.issued_at),
            "expires_at": float(c.expires_at),
            "renew_after": float(c.renew_after),
        }


def enroll_token(secret: bytes) -> str:
    """The population's enroll token (hex): the same for every population name. One
    derivation for the selectors and the operator (which makes it into the enrollment
    Secret): :func:`fedfleet.core.population_spec.population_enroll_token`."""
    return population_enroll_token(secret)


def new_device_id() -> str:
    """A fresh, random device id (``d-`` and 24 hex characters): the server picks it."""
    return "d-" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class PopulationKeys:
    """The keys derived from one population's secret."""

    population: str
    enroll_token: str
    """Hex; presented as ``Authorization: Bearer`` to ``POST /v1/enroll`` only."""
    credential_key: bytes

    @classmethod
    def from_secret(cls, secret: bytes, population: str) -> PopulationKeys:
        token = enroll_token(secret)
        if not population:
            raise ValueError("the population name must not be empty")
        return cls(
            population=population,
            enroll_token=token,
            credential_key=hmac.new(secret, _CREDENTIAL_LABEL, hashlib.sha256).digest(),
        )

    def enroll_ok(self, token: str | None) -> bool:
        """Is ``token`` this population's enroll token (constant-time)?"""
        if not token or not token.isascii():
            return False
        return hmac.compare_digest(self.enroll_token, token)

    def _sign(self, payload: str) -> str:
        message = f"{CREDENTIAL_VERSION}.{payload}".encode("ascii")
        return _b64(hmac.new(self.credential_key, message, hashlib.sha256).digest())

    def issue(
        self, device_id: str, now: float, ttl: int = DEFAULT_TTL_S, *, jti: str | None = None
    ) -> Credential:
        """A credential for ``device_id``, valid from ``now`` (whole seconds) for ``ttl`` s."""
        if ttl <= 0:
            raise ValueError("a credential's lifetime must be positive")
        iat = int(now)
        claims = Claims(
            device_id, self.population, iat, iat + int(ttl), jti or secrets.token_hex(8)
        )
        body = json.dumps(claims.to_json(), sort_keys=True, separators=(",", ":"))
        payload = _b64(body.encode("utf-8"))
        token = f"{CREDENTIAL_VERSION}.{payload}.{self._sign(payload)}"
        if len(token) > MAX_CREDENTIAL_CHARS:
            raise ValueError(f"a credential for this device id would pass {MAX_CREDENTIAL_CHARS}")
        return Credential(token, claims)

    def verify(
        self, token: str | None, device_id: str, now: float, *, revoked_at: float | None = None
    ) -> Claims | None:
        """The claims of ``token`` if it is a valid credential of ``device_id`` at ``now``.

        ``revoked_at`` is the device's revocation record, if any: it refuses every credential
        issued at or before it. Any malformed, forged, foreign or stale token gives None.
        """
        claims = self.claims_of(token)
        if claims is None or claims.device_id != device_id:
            return None
        if not claims.issued_at - CLOCK_SKEW_S <= now < claims.expires_at:
            return None
        if revoked_at is not None and claims.issued_at <= revoked_at:
            return None
        return claims

    def claims_of(self, token: str | None) -> Claims | None:
        """The claims of a well-formed token signed with this key for this population,
        without the time, device and revocation checks (None otherwise)."""
        if not token or len(token) > MAX_CREDENTIAL_CHARS or not token.isascii():
            return None
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != CREDENTIAL_VERSION:
            return None
        _, payload, sig = parts
        if not _B64URL.match(payload) or not hmac.compare_digest(self._sign(payload), sig):
            return None
        raw = _unb64(payload)
        if raw is None:
            return None
        claims = _parse(raw)
        if claims is None or claims.population != self.population:
            return None
        return claims


def _parse(raw: bytes) -> Claims | None:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or set(doc) != _KEYS:
        return None
    sub, pop, iat, exp, jti = (doc[k] for k in ("sub", "pop", "iat", "exp", "jti"))
    if not (isinstance(sub, str) and sub and isinstance(pop, str) and pop):
        return None
    if not all(type(t) is int for t in (iat, exp)) or exp <= iat:
        return None
    if not isinstance(jti, str) or not _JTI.match(jti):
        return None
    return Claims(sub, pop, iat, exp, jti)
