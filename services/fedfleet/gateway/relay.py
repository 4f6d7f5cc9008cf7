"""The gateway's hop to a job's selector: fedfleet's HTTP/1.1 keep-alive client, plain http.

Every device call through the gateway is one request to a selector on the cluster network, so
the hop's cost is the gateway's cost: measured with ``bench/gateway.py``, httpx spent about
3-5 ms of CPU per relayed check-in (its connection pool and anyio streams), six times what
the selector itself spends answering it. The relay is :class:`fedfleet.http11.Http11Client`
(idle connections kept per address, httptools' parser, bounded answers, a failed connection
never reused, a request repeated once only when a reused idle connection was closed before it
was read) restricted to ``http://`` selectors. Even a request the selector did take would be
harmless to repeat here: a device's check-in selects it once, and its second report for a
round is refused.
"""

from __future__ import annotations

from fedfleet.http11 import IDLE_SECONDS, MAX_RESPONSE_BYTES, Http11Client, HttpError, Response

__all__ = ["Relay", "RelayError", "RelayResponse"]

RelayError = HttpError
"""The selector could not be reached, or its answer was cut short, malformed or too large."""
RelayResponse = Response


class Relay(Http11Client):
    """Requests to selectors (``http://host:port``) over pooled keep-alive connections."""

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        idle_seconds: float = IDLE_SECONDS,
        max_idle_per_address: int = 256,
        max_response: int = MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(
            connect_timeout=connect_timeout,
            idle_seconds=idle_seconds,
            max_idle_per_address=max_idle_per_address,
            max_response=max_response,
        )
