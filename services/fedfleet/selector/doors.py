"""The device API's doors: what each route takes and which credential it needs, from headers.

A device proves who it is on every request before the selector reads a byte of its body (see
:mod:`fedfleet.service.gate`): a check-in carries the device's credential (or its job token,
:mod:`fedfleet.selector.credentials`) for the device named in ``x-fedfleet-device``, and so
does a checkpoint download (the global model is the job's property, not public); every later
call of its task (the plan poll, the report, the Secure Aggregation steps, the abort) carries
the report ticket the selection issued, bound to the job, the attempt in the path and that
device. Bodies are bounded per route: a check-in
or an abort is a few hundred bytes of JSON, a report at most ``maxUpdateBytes``, a Secure
Aggregation message at most its step's limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedfleet.core.protocol import secagg_message_limit
from fedfleet.core.spec import FLJob
from fedfleet.service.gate import Door, Refusal, Seen, bearer

if TYPE_CHECKING:
    from fedfleet.selector.credentials import DeviceAuth

__all__ = [
    "CHECKIN_LIMIT",
    "ID",
    "ROUND",
    "SMALL_JSON_LIMIT",
    "device_doors",
    "ticket_check",
    "token_check",
]

ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
ROUND = r"^a[0-9]{1,18}$"
CHECKIN_LIMIT = 1024
"""Bytes of a check-in body: six short fields are about 150 bytes."""
SMALL_JSON_LIMIT = 1024
"""Bytes of an abort body (a device id and a short reason)."""
_ROUND = r"(?P<round>[^/]+)"
"""Doors match any round segment, so a malformed one is refused (422) rather than passed to a
route-less 404 with an unbounded body."""
_ROUND_KEY = re.compile(ROUND)
_ID = re.compile(ID)
_NO_TICKET = Refusal(401, "missing x-fedfleet-device or x-fedfleet-ticket header")
_BAD_TICKET = Refusal(403, "invalid ticket for this device and round")

TicketOk = Callable[[str, str, str], bool]
"""``(round_key, device_id, ticket) -> bool``: the selector's ticket check."""


def token_check(auth: DeviceAuth, *, limited: bool = False) -> Callable[[Seen], Refusal | None]:
    def check(seen: Seen) -> Refusal | None:
        return auth.check(
            seen.headers.get("x-fedfleet-device", ""), bearer(seen.headers), limited=limited
        )

    return check


def ticket_check(
    ticket_ok: TicketOk, *, device_in_query: bool = False
) -> Callable[[Seen], Refusal | None]:
    def check(seen: Seen) -> Refusal | None:
        device = (seen.query if device_in_query else seen.headers).get(
            "device_id" if device_in_query else "x-fedfleet-device", ""
        )
        ticket = seen.headers.get("x-fedfleet-ticket", "")
        if not _ROUND_KEY.match(seen.path["round"]):
            return Refusal(422, "malformed round key")
        if not device or not ticket:
            return _NO_TICKET
        if len(ticket) > 128 or not _ID.match(device):
            return _BAD_TICKET
        if not ticket_ok(seen.path["round"], device, ticket):
            return _BAD_TICKET
        return None

    return check


def device_doors(job: FLJob, auth: DeviceAuth, ticket_ok: TicketOk) -> list[Door]:
    """The doors of the selector's ``/v1`` routes for ``job`` (enrollment's are
    :func:`fedfleet.selector.enroll_routes.enroll_doors`)."""
    ticketed = ticket_check(ticket_ok)
    agg = job.spec.aggregation
    return [
        Door("POST", re.compile(r"/v1/checkin"), CHECKIN_LIMIT, token_check(auth, limited=True)),
        Door("GET", re.compile(r"/v1/checkpoints/[^/]+"), 0, token_check(auth)),
        Door("POST", re.compile(rf"/v1/reports/{_ROUND}"), agg.max_update_bytes, ticketed),
        Door(
            "POST",
            re.compile(rf"/v1/secagg/{_ROUND}/[^/]+"),
            secagg_message_limit(agg),
            ticketed,
        ),
        Door("POST", re.compile(rf"/v1/aborts/{_ROUND}"), SMALL_JSON_LIMIT, ticketed),
        Door(
            "GET",
            re.compile(rf"/v1/tasks/{_ROUND}"),
            0,
            ticket_check(ticket_ok, device_in_query=True),
        ),
    ]
