"""When a real device enrolls, renews its credential, or must stop: the enrollment rules.

Per the enrollment design a device enrolls once (``POST /v1/enroll`` with the population's
token) and keeps the identity it got in its state directory; later starts reuse it and need no
token. It renews the credential once half its lifetime has passed, retrying a failed renewal
with a long backoff while the old credential still works. A 401 to the stored credential means
it was revoked or has expired: the device stops (:class:`CredentialRefused`, exit status 3 in
the CLI) and never re-enrolls by itself, since a silently re-enrolled device would be a new
identity the operator never approved; ``re_enroll`` forces a fresh enrollment on purpose.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import UTC, datetime

from fedfleet.device.enroll_client import EnrollmentClient
from fedfleet.device.http_transport import ProtocolError, Refused, ServerBusy, Unreachable
from fedfleet.device.scheduling import backoff_delay, renew_due, retry_after_delay
from fedfleet.device.state import Identity, StateDir, StateError
from fedfleet.device.upload import Interruptible

__all__ = ["CREDENTIAL_REFUSED", "CredentialRefused", "Enrollment", "EnrollmentRefused", "when"]

log = logging.getLogger("fedfleet.device")

CREDENTIAL_REFUSED = "credential refused (revoked or expired): re-enroll with --re-enroll"


class CredentialRefused(Exception):
    """The server refused this device's stored credential (401): revoked or expired."""

    def __init__(self) -> None:
        super().__init__(CREDENTIAL_REFUSED)


class EnrollmentRefused(StateError):
    """Enrollment cannot succeed as configured (no or a wrong token, unknown population)."""


def when(t: float) -> str:
    """A unix time for a log line."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


class Enrollment:
    """The identity of the device in ``state`` for ``population`` at ``server``."""

    def __init__(
        self,
        client: EnrollmentClient,
        state: StateDir,
        server: str,
        population: str,
        enroll_token: str | None,
        waits: Interruptible,
        rng: random.Random,
    ) -> None:
        self.client = client
        self.state = state
        self.server = server
        self.population = population
        self.enroll_token = enroll_token
        self.waits = waits
        self.rng = rng
        self._renew_failures = 0
        self._renew_not_before = 0.0

    def stored(self, re_enroll: bool) -> Identity | None:
        """The identity in the state directory (forgotten first when ``re_enroll``)."""
        identity = self.state.load_identity()
        if identity is not None and re_enroll:
            log.info("re-enrolling: forgetting device %s", identity.device_id)
            self.state.clear_identity()
            return None
        if identity is None:
            return None
        if identity.population != self.population:
            raise EnrollmentRefused(
                f"state directory {self.state.path} belongs to population "
                f"{identity.population!r}, not {self.population!r} (use another --state)"
            )
        if identity.server != self.server:
            log.info("server moved from %s to %s", identity.server, self.server)
            identity = Identity.from_dict({**identity.as_dict(), "server": self.server})
            self.state.save_identity(identity)
        return identity

    async def enroll(self) -> Identity:
        """A new identity from the server, saved; retried while it is unreachable or busy."""
        if not self.enroll_token:
            raise EnrollmentRefused(
                f"this device is not enrolled yet (no identity in {self.state.path}): "
                "give it the population's enrollment token (--enroll-token)"
            )
        failures = 0
        while True:
            try:
                identity = await self.waits.guard(
                    self.client.enroll(self.population, self.enroll_token)
                )
                break
            except Refused as exc:
                if exc.status == 401:
                    raise EnrollmentRefused("enrollment token refused (401)") from None
                if exc.status != 429:
                    raise EnrollmentRefused(f"enrollment refused: {exc}") from None
                failures += 1
                delay = retry_after_delay(exc.retry_after, failures, self.rng)
            except (Unreachable, ServerBusy, ProtocolError) as exc:
                failures += 1
                delay = (
                    retry_after_delay(exc.retry_after, failures, self.rng)
                    if isinstance(exc, ServerBusy)
                    else backoff_delay(failures, self.rng)
                )
                log.info("enroll: %s; retrying in %.1fs", exc, delay)
            await self.waits.sleep(delay)
        self.state.save_identity(identity)
        log.info(
            "enrolled as %s in %s (credential expires %s)",
            identity.device_id,
            identity.population,
            when(identity.expires_at),
        )
        return identity

    async def renew_if_due(self, identity: Identity) -> Identity:
        """``identity``, or a renewed one once it is due (saved). A failed renewal is retried
        later (30 s .. 1 h backoff); a 401 is :class:`CredentialRefused`."""
        now = time.time()
        if not renew_due(identity, now) or now < self._renew_not_before:
            return identity
        try:
            renewed = await self.waits.guard(self.client.renew(identity))
        except Refused as exc:
            if exc.status == 401:
                raise CredentialRefused from None
            renewed, error = None, str(exc)
        except (Unreachable, ServerBusy, ProtocolError) as exc:
            renewed, error = None, str(exc)
        if renewed is None:
            self._renew_failures += 1
            delay = backoff_delay(self._renew_failures, self.rng, low=30.0, high=3600.0)
            self._renew_not_before = now + delay
            log.info("renew: %s; trying again in %.0fs", error, delay)
            return identity
        self._renew_failures = 0
        self.state.save_identity(renewed)
        log.info("credential renewed (expires %s)", when(renewed.expires_at))
        return renewed
