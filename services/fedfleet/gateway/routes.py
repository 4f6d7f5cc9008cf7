"""The population gateway's routes: which job selectors serve a population, and how a device's
later calls find the one that selected it.

A job's selector that holds its population's secret **announces** itself in the store every
tick (:func:`announce`), under the population's **scope** (:func:`route_scope`: its name and a
fingerprint of its secret, so that two populations of one name, in two namespaces sharing a
store, never see each other's jobs): a :class:`Route` naming its job, its address, the job's
``spec.scheduling`` (priority, weight), whether its round has room for one more device now, and
the body limits of its routes. The gateway reads the population's live routes each tick and
offers a check-in to them in :func:`offer_order`: routes with room first, highest priority
first, and among equal priority in a weighted random order (so each job's share of the
check-ins follows its weight); a job whose round is full is asked only when no job has room,
for its pacing window.

A selection is answered with a **route ticket**: ``g1.<route>.<mac>.<ticket>``, the selector's
own report ticket wrapped with the route's id and a MAC under a key derived from the population
secret, bound to the round and the device (:class:`RouteKeys`). The device presents it like any
ticket; the gateway checks the MAC from the headers before it reads a body, unwraps it and
relays the call to that route. The selector still checks its own ticket.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
from dataclasses import asdict, dataclass
from typing import Final

from fedfleet.store.base import Store

__all__ = [
    "ROUTE_TTL_S",
    "Route",
    "RouteKeys",
    "WrappedTicket",
    "announce",
    "offer_order",
    "parse_routes",
    "route_id",
    "route_scope",
    "withdraw",
]

ROUTE_TTL_S: Final = 10.0
"""How long an announcement lasts without a refresh: a selector that died unannounced stops
receiving devices this long after its last tick."""
_ROUTE_LABEL: Final = b"fedfleet/population/route"
_SCOPE_LABEL: Final = b"fedfleet/population/scope"
_PREFIX: Final = "g1"
_ROUTE_RE: Final = re.compile(r"^[0-9a-f]{16}$")
_MAC_BYTES: Final = 16


def route_scope(population: str, secret: bytes) -> str:
    """Where a population's routes live in the store: its name and 16 hex characters of a MAC
    of the name under its secret. Selectors and the gateway of the same population (the same
    secret) agree on it; a population of the same name with another secret does not."""
    mac = hmac.new(secret, _SCOPE_LABEL + b"\x00" + population.encode(), hashlib.sha256)
    return f"{population}.{mac.hexdigest()[:16]}"


def route_id(job: str, actor_id: str) -> str:
    """The route of one selector of one job: 16 hex characters, stable across its restarts."""
    return hashlib.sha256(f"{job}\x00{actor_id}".encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Route:
    """One job selector as the gateway sees it (the JSON entry of the store's route)."""

    job: str
    actor: str
    address: str
    priority: int
    weight: int
    open: bool
    """The round is selecting and this selector's quota has room."""
    report_limit: int
    secagg_limit: int

    @property
    def id(self) -> str:
        return route_id(self.job, self.actor)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Route:
        """Parse an entry; ValueError for anything but the exact fields and types."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or set(raw) != set(cls.__dataclass_fields__):
            raise ValueError("route entry: wrong fields")
        ints = ("priority", "weight", "report_limit", "secagg_limit")
        if not all(isinstance(raw[k], str) for k in ("job", "actor", "address")):
            raise ValueError("route entry: job, actor and address must be strings")
        if not all(type(raw[k]) is int for k in ints) or type(raw["open"]) is not bool:
            raise ValueError("route entry: wrong types")
        if not raw["address"].startswith(("http://", "https://")) or raw["weight"] < 1:
            raise ValueError("route entry: bad address or weight")
        return cls(**raw)


def parse_routes(entries: dict[str, str]) -> tuple[dict[str, Route], list[str]]:
    """The store's entries as routes, keyed by id, and the ids of entries that do not parse
    (or whose id does not match their job and actor)."""
    routes: dict[str, Route] = {}
    bad: list[str] = []
    for rid, text in entries.items():
        try:
            route = Route.from_json(text)
        except (ValueError, TypeError):
            bad.append(rid)
            continue
        if route.id != rid:
            bad.append(rid)
            continue
        routes[rid] = route
    return routes, bad


def announce(store: Store, scope: str, route: Route, ttl: float = ROUTE_TTL_S) -> None:
    """Announce ``route`` under ``scope`` (:func:`route_scope`) for ``ttl`` seconds."""
    store.announce_route(scope, route.id, route.to_json(), ttl)


def withdraw(store: Store, scope: str, job: str, actor_id: str) -> None:
    store.withdraw_route(scope, route_id(job, actor_id))


def _weighted_order(routes: list[Route], rng: random.Random) -> list[Route]:
    """A weighted random permutation of the jobs (Efraimidis-Spirakis keys), each job's
    selectors shuffled behind it: the first job is job j with probability w_j / sum(w)."""
    by_job: dict[str, list[Route]] = {}
    for r in routes:
        by_job.setdefault(r.job, []).append(r)
    keyed = sorted(
        by_job.items(),
        key=lambda item: rng.random() ** (1.0 / max(r.weight for r in item[1])),
        reverse=True,
    )
    out: list[Route] = []
    for _, selectors in keyed:
        selectors = sorted(selectors, key=lambda r: r.actor)
        rng.shuffle(selectors)
        out.extend(selectors)
    return out


def offer_order(routes: list[Route], rng: random.Random) -> list[Route]:
    """The order in which to offer one check-in (see the module doc): every route with room,
    by priority then weight; then one full route of the highest priority (its pacing window
    is the answer when no job has room). Empty when no job runs."""
    if not routes:
        return []
    out: list[Route] = []
    for priority in sorted({r.priority for r in routes}, reverse=True):
        out.extend(_weighted_order([r for r in routes if r.open and r.priority == priority], rng))
    top = max(r.priority for r in routes)
    full = [r for r in routes if not r.open and r.priority == top]
    out.extend(_weighted_order(full, rng)[:1])
    return out


@dataclass(frozen=True, slots=True)
class WrappedTicket:
    route: str
    ticket: str
    """The selector's own ticket."""


class RouteKeys:
    """Wraps and checks route tickets under a key derived from the population secret."""

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, _ROUTE_LABEL, hashlib.sha256).digest()

    def _mac(self, route: str, round_key: str, device_id: str, ticket: str) -> str:
        msg = f"{route}\x00{round_key}\x00{device_id}\x00{ticket}".encode()
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def wrap(self, route: str, round_key: str, device_id: str, ticket: str) -> str:
        """The device's ticket: at most 2 + 16 + 22 + 3 characters longer than the selector's."""
        return f"{_PREFIX}.{route}.{self._mac(route, round_key, device_id, ticket)}.{ticket}"

    def unwrap(self, wrapped: str, round_key: str, device_id: str) -> WrappedTicket | None:
        """The route and the selector's ticket, or None when the ticket is not one this
        population's gateway issued for this round and device."""
        parts = wrapped.split(".", 3)
        if len(parts) != 4 or parts[0] != _PREFIX or not _ROUTE_RE.match(parts[1]):
            return None
        _, route, mac, ticket = parts
        if not ticket or not ticket.isascii() or not mac.isascii():
            return None
        if not hmac.compare_digest(self._mac(route, round_key, device_id, ticket), mac):
            return None
        return WrappedTicket(route, ticket)
