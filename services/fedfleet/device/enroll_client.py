"""The device's side of enrollment: ``POST /v1/enroll`` and ``POST /v1/enroll/renew``.

A real device enrolls once with its population's enrollment token and from then on speaks with
its own credential (see the enrollment design: a signed, expiring token bound to the device id
the *server* picked). These two calls sit next to
:class:`~fedfleet.device.http_transport.SelectorClient` and fail with the same typed errors
(:class:`~fedfleet.device.http_transport.Unreachable`, ``ServerBusy`` for 503, ``Refused`` with
``retry_after`` for 429 and with the status for 401/404/...), so the agent handles them with the
same backoff. The answer is checked field by field before anything is stored: a server (or
something pretending to be one) cannot make the device write junk into its identity.
"""

from __future__ import annotations

import ssl

import httpx

from fedfleet.device.http_transport import Refused, Unreachable, _fail, _json
from fedfleet.device.state import Identity, StateError

__all__ = ["EnrollmentClient"]


class EnrollmentClient:
    """Enrollment and renewal against one selector endpoint (``base_url``)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        tls = ssl.create_default_context()
        if ca_file:
            tls.load_verify_locations(cafile=ca_file)
        self._http = httpx.AsyncClient(
            verify=tls,
            base_url=self.base_url,
            headers={"user-agent": "fedfleet-device/1"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, url: str, **kwargs: object) -> httpx.Response:
        try:
            return await self._http.post(url, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise Unreachable(f"{self.base_url}: {type(exc).__name__}: {exc}") from exc

    def _identity(self, response: httpx.Response, population: str, status: int) -> Identity:
        if response.status_code != status:
            raise _fail(response)
        body = _json(response)
        try:
            identity = Identity.from_dict(
                {**body, "server": self.base_url}, f"answer of {response.request.url.path}"
            )
        except StateError as exc:
            raise Refused(response.status_code, f"unusable enrollment answer: {exc}") from None
        if identity.population != population:
            raise Refused(
                response.status_code,
                f"the server enrolled the device in population {identity.population!r}, "
                f"not {population!r}",
            )
        return identity

    async def enroll(self, population: str, enroll_token: str) -> Identity:
        """A new identity for this device (201), with a device id the server picked."""
        r = await self._post(
            "/v1/enroll",
            json={"population": population},
            headers={"authorization": f"Bearer {enroll_token}"},
        )
        return self._identity(r, population, 201)

    async def renew(self, identity: Identity) -> Identity:
        """A fresh credential for the same device id (200); 401 when it was revoked or
        expired."""
        r = await self._post(
            "/v1/enroll/renew",
            headers={
                "authorization": f"Bearer {identity.credential}",
                "x-fedfleet-device": identity.device_id,
            },
        )
        renewed = self._identity(r, identity.population, 200)
        if renewed.device_id != identity.device_id:
            raise Refused(200, "renewal answered for another device id")
        return renewed
