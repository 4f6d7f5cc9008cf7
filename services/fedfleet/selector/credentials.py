"""Who may call a selector's token doors: an enrolled device's credential, or a job token.

A selector given its population's secret accepts, on the check-in and the checkpoint download,
either a valid **population credential** (:mod:`fedfleet.service.enrollment`: signed, expiring,
bound to the device and the population, not revoked) or the **legacy job token**
(``HMAC(job device key, device id)``, which the simulated fleets keep using). Without a
population secret only job tokens are accepted, as before; the population's gateway
(:mod:`fedfleet.gateway`) has no job keys and accepts credentials only.

Revocations live in the store (:meth:`Store.revoke_device`); the selector's tick swaps in a
fresh view of them (:meth:`DeviceAuth.refresh`), so a revocation takes effect within one tick
without a store round trip per request.

Credential-authenticated check-ins are rate limited per device (a token bucket keyed by the
device id the credential proved): a real device that loops is told to come back later (429,
``Retry-After``). Job-token devices are the selector's own simulated fleets, paced by the
job, and anyone with the job secret can mint any number of device ids anyway, so a per-device
bucket would protect nothing there.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping

from fedfleet.selector.doors import ID
from fedfleet.selector.ratelimit import RateLimiter, retry_after
from fedfleet.service.enrollment import Claims, PopulationKeys
from fedfleet.service.gate import Refusal
from fedfleet.service.keys import JobKeys
from fedfleet.store.base import Store

__all__ = ["UNAUTHENTICATED", "DeviceAuth"]

_ID = re.compile(ID)
UNAUTHENTICATED = Refusal(401, "missing or invalid device token", {"WWW-Authenticate": "Bearer"})
_MAX_LEGACY_TOKEN = 128


class DeviceAuth:
    """The selector's view of device credentials (see the module doc)."""

    def __init__(
        self,
        keys: JobKeys | None,
        population: PopulationKeys | None,
        *,
        checkin_limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.population = population
        self.checkin_limiter = checkin_limiter
        self._clock = clock
        self.revoked: Mapping[str, float] = {}
        """device id -> revoked at; replaced whole by :meth:`refresh`."""

    def refresh(self, store: Store) -> None:
        """Swap in the store's current revocations (the tick calls this)."""
        if self.population is not None:
            self.revoked = store.revoked_devices(self.population.population)

    def credential(
        self, device_id: str, token: str | None, revoked: Mapping[str, float] | None = None
    ) -> Claims | None:
        """The claims of a valid population credential of ``device_id`` (None otherwise),
        against ``revoked`` (default: the tick's view)."""
        if self.population is None or token is None:
            return None
        view = self.revoked if revoked is None else revoked
        return self.population.verify(
            token, device_id, self._clock(), revoked_at=view.get(device_id)
        )

    def job_token_ok(self, device_id: str, token: str | None) -> bool:
        if self.keys is None or not token or len(token) > _MAX_LEGACY_TOKEN:
            return False
        if not token.isascii():
            return False
        return self.keys.device_ok(device_id, token)

    def ok(self, device_id: str, token: str | None) -> bool:
        """A credential or a job token of ``device_id``."""
        return self.credential(device_id, token) is not None or self.job_token_ok(device_id, token)

    def check(self, device_id: str, token: str | None, *, limited: bool = False) -> Refusal | None:
        """The door check: None lets the request in; a 401, or 429 when ``limited`` and the
        credential's device has no check-in left in its bucket."""
        if not _ID.match(device_id):
            return UNAUTHENTICATED
        if self.credential(device_id, token) is not None:
            if limited and self.checkin_limiter is not None:
                wait = self.checkin_limiter.take(device_id, self._clock())
                if wait > 0:
                    return Refusal(
                        429,
                        "too many check-ins from this device; come back later",
                        {"Retry-After": retry_after(wait)},
                    )
            return None
        return None if self.job_token_ok(device_id, token) else UNAUTHENTICATED
