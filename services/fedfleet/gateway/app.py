"""The population gateway: one URL for every job of a population, today's and tomorrow's.

Devices know one address and a population name (issue #11 §3). Jobs of the population come and
go behind it: each job's selectors announce themselves in the store (:mod:`.routes`); the
gateway reads the announcements every tick and

* **enrolls** devices and renews their credentials itself (it holds the population secret,
  :mod:`fedfleet.selector.enroll_routes`), so enrollment works while no job runs;
* offers each **check-in** to the running jobs by ``spec.scheduling`` (highest priority with
  room first, weighted among equals; :func:`.routes.offer_order`), relaying it to a selector
  of the chosen job and wrapping the selection's ticket with the route (:class:`.RouteKeys`);
  when no job runs the device gets a reconnect window (``no-job``), never "not needed";
* relays the **later calls** (plan poll, report, Secure Aggregation steps, abort) to the
  selector that selected the device, found from the ticket, and the **checkpoint** download
  from the route in the task's ``checkpoint_url``.

Every request is authenticated from its headers before the body is read: credentials (no job
tokens: the gateway holds no job's secret), or a route ticket's MAC. The selector behind it
checks the device's credential and its own ticket again. The gateway keeps no state but the
routes' view, so replicas behind one Service need no session affinity.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Final
from urllib.parse import urlencode

from fastapi import FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic_core import to_json

from fedfleet.core.protocol import SECAGG_STEP_PATTERN
from fedfleet.gateway.relay import Relay, RelayError, RelayResponse
from fedfleet.gateway.routes import (
    Route,
    RouteKeys,
    WrappedTicket,
    offer_order,
    parse_routes,
    route_scope,
)
from fedfleet.selector import contract
from fedfleet.selector.app import CheckInRequest, CheckInResponse, TaskResponse
from fedfleet.selector.doors import (
    CHECKIN_LIMIT,
    ID,
    ROUND,
    SMALL_JSON_LIMIT,
    ticket_check,
    token_check,
)
from fedfleet.selector.enroll_routes import (
    EnrollmentSettings,
    add_enroll_routes,
    device_auth,
    enroll_doors,
)
from fedfleet.service.gate import Door, bearer, install
from fedfleet.service.ops import Ticker, add_ops_routes, ticking_lifespan
from fedfleet.store.base import Store

__all__ = ["MAX_OFFERS", "NO_JOB_WINDOW_S", "create_app"]

log = logging.getLogger("fedfleet.gateway")

MAX_OFFERS: Final = 3
"""Most selectors one check-in is offered to before the device gets the last answer."""
NO_JOB_WINDOW_S: Final = (15.0, 45.0)
"""When no job of the population runs: come back after a uniform draw from this range, and
within 30 s after that (devices spread out instead of all returning at once)."""
DEFAULT_MAX_BODY: Final = 64 * 1024 * 1024
"""The gate's bound on a relayed report or Secure Aggregation message; each route's own
(smaller, per job) limit is applied before the body is read."""
_RELAYED_HEADERS: Final = ("retry-after", "etag", "cache-control", "www-authenticate")
_GONE: Final = {"detail": "the selector holding this round is gone; check in again"}


def _relay(r: RelayResponse) -> Response:
    headers: dict[str, str] = {k: r.headers[k] for k in _RELAYED_HEADERS if k in r.headers}
    return Response(
        r.body,
        status_code=r.status,
        media_type=r.headers.get("content-type"),
        headers=headers,
    )


def _window(rng: random.Random, reason: str = "no-job") -> dict[str, Any]:
    """A reconnect answer the gateway gives itself (no job runs, or the round's selector is
    gone), spread over :data:`NO_JOB_WINDOW_S`."""
    after = rng.uniform(*NO_JOB_WINDOW_S)
    return {
        "outcome": "reconnect",
        "reconnect_after_s": round(after, 3),
        "reconnect_within_s": round(after + 30.0, 3),
        "reason": reason,
    }


def create_app(
    population: str,
    secret: bytes,
    store: Store,
    *,
    actor_id: str = "gateway",
    tick_seconds: float = 0.5,
    enrollment: EnrollmentSettings | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    rng: random.Random | None = None,
) -> FastAPI:
    """The gateway of ``population`` (see the module doc); its tick starts with the app."""
    rng = rng or random.Random()
    keys = RouteKeys(secret)
    scope = route_scope(population, secret)
    auth = device_auth(None, population, secret, enrollment)
    routes: dict[str, Route] = {}
    down: set[str] = set()
    """Routes that refused a connection since the last tick: skipped until the next one."""
    registry = CollectorRegistry()
    checkins = Counter(
        "fedfleet_gateway_checkins",
        "Check-ins by answer: selected, reconnect (a job's window), no-job (no job runs), "
        "refused (credentials, rate), unavailable (no selector reachable)",
        ["outcome"],
        registry=registry,
    )
    relays = Counter(
        "fedfleet_gateway_relays",
        "Calls relayed to a job's selector, by route kind and HTTP status",
        ["kind", "status"],
        registry=registry,
    )
    Gauge(
        "fedfleet_gateway_routes", "Live job selectors behind the gateway", registry=registry
    ).set_function(lambda: float(len(routes)))
    # No bound on relayed connections here: every selected device holds one plan poll through
    # the gateway, and the server's own connection limit already bounds how many come in.
    client = Relay()

    def tick(now: float) -> None:
        nonlocal routes
        found, bad = parse_routes(store.population_routes(scope))
        if bad:
            log.warning("unreadable route entries ignored", extra={"routes": bad[:5]})
        routes = found  # swapped whole: a request in flight sees the old map or the new one
        down.clear()
        auth.refresh(store)

    ticker = Ticker(f"gateway-{population}", tick, tick_seconds)

    ticking = ticking_lifespan(ticker, log, "gateway", lambda: None, population=population)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with ticking(app):
            yield
        await client.aclose()

    app = FastAPI(
        title="fedfleet device API (population gateway)",
        version="1",
        lifespan=lifespan,
        description=f"The one endpoint of population {population!r}: enrollment, check-in "
        "routed to its running jobs, and the selected device's calls relayed to its selector.",
    )
    contract.document(app)

    def issued(round_key: str, device_id: str, ticket: str) -> bool:
        """A route ticket this population's gateway issued for this round and device."""
        return keys.unwrap(ticket, round_key, device_id) is not None

    ticketed = ticket_check(issued)

    rnd = r"(?P<round>[^/]+)"
    install(
        app,
        [
            Door(
                "POST", re.compile(r"/v1/checkin"), CHECKIN_LIMIT, token_check(auth, limited=True)
            ),
            Door("GET", re.compile(r"/v1/checkpoints/[^/]+"), 0, token_check(auth)),
            Door("GET", re.compile(r"/v1/routes/[^/]+/checkpoints/[^/]+"), 0, token_check(auth)),
            Door("POST", re.compile(rf"/v1/reports/{rnd}"), max_body, ticketed),
            Door("POST", re.compile(rf"/v1/secagg/{rnd}/[^/]+"), max_body, ticketed),
            Door("POST", re.compile(rf"/v1/aborts/{rnd}"), SMALL_JSON_LIMIT, ticketed),
            Door(
                "GET",
                re.compile(rf"/v1/tasks/{rnd}"),
                0,
                ticket_check(issued, device_in_query=True),
            ),
            *enroll_doors(auth, enrollment),
        ],
    )
    add_enroll_routes(app, auth, store, enrollment)
    add_ops_routes(
        app,
        registry,
        ticker,
        status=lambda: {"actor": actor_id, "population": population, "routes": len(routes)},
    )

    def routed(ticket: str, round_key: str, device_id: str) -> tuple[WrappedTicket, Route | None]:
        """The unwrapped ticket and its selector (None once that selector is gone: the round's
        selection lived in it, so the device checks in again)."""
        wrapped = keys.unwrap(ticket, round_key, device_id)
        if wrapped is None:  # the door checked it; a request cannot get here without one
            raise HTTPException(403, "invalid ticket for this device and round")
        return wrapped, routes.get(wrapped.route)

    def device_headers(request: Request, ticket: str | None = None) -> dict[str, str]:
        wanted = (
            "authorization",
            "x-fedfleet-device",
            "x-fedfleet-examples",
            "x-fedfleet-aggregator",
            "x-fedfleet-metrics",
            "content-type",
            "if-none-match",
        )
        out = {k: request.headers[k] for k in wanted if k in request.headers}
        if ticket is not None:
            out["x-fedfleet-ticket"] = ticket
        return out

    # -- check-in --------------------------------------------------------------------------------
    @app.post(
        "/v1/checkin",
        response_model=CheckInResponse,
        response_model_exclude_none=True,
        responses=contract.CHECKIN["responses"],
        openapi_extra=contract.CHECKIN["openapi_extra"],
    )
    async def check_in(body: CheckInRequest, request: Request) -> Any:
        # The door checked the credential for x-fedfleet-device; the body must name the same.
        if auth.credential(body.device_id, bearer(request.headers)) is None:
            checkins.labels("refused").inc()
            raise HTTPException(
                401, "missing or invalid device token", {"WWW-Authenticate": "Bearer"}
            )
        if body.population != population:
            checkins.labels("reconnect").inc()
            answer = {
                "outcome": "reconnect",
                "reconnect_after_s": 3600.0,
                "reconnect_within_s": 7200.0,
                "reason": "unknown-population",
            }  # as a selector answers it
            return Response(to_json(answer), media_type="application/json")
        order = [r for r in offer_order(list(routes.values()), rng) if r.id not in down]
        if not order:
            checkins.labels("no-job").inc()
            return Response(to_json(_window(rng)), media_type="application/json")
        payload = body.model_dump_json().encode()
        headers = device_headers(request)
        headers["content-type"] = "application/json"
        last: RelayResponse | None = None
        for route in order[:MAX_OFFERS]:
            try:
                r = await client.request(
                    "POST", route.address, "/v1/checkin", body=payload, headers=headers
                )
            except RelayError as exc:
                log.warning("selector unreachable", extra={"route": route.id, "error": str(exc)})
                down.add(route.id)
                continue
            relays.labels("checkin", str(r.status)).inc()
            if r.status != 200:
                last = r
                if r.status in (401, 429):  # about the device, not the job: say so now
                    break
                continue
            reply: Any = None
            try:
                reply = r.json()
            except ValueError:
                pass
            if not isinstance(reply, dict):  # not a selector's reply: skip that address
                log.warning("unreadable check-in reply", extra={"route": route.id})
                down.add(route.id)
                continue
            if reply.get("outcome") == "selected" and isinstance(reply.get("ticket"), str):
                reply["ticket"] = keys.wrap(
                    route.id, str(reply["round_key"]), body.device_id, reply["ticket"]
                )
                checkins.labels("selected").inc()
                return Response(to_json(reply), media_type="application/json")
            last = r
            if not route.open:  # a full job's pacing window: the answer when none has room
                break
        if last is None:
            checkins.labels("unavailable").inc()
            return JSONResponse(
                {"detail": "no selector of the population is reachable; retry later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        checkins.labels("reconnect" if last.status == 200 else "refused").inc()
        return _relay(last)

    # -- the selected device's calls ---------------------------------------------------------------
    @app.get(
        "/v1/tasks/{round_key}",
        response_model=TaskResponse,
        responses=contract.TASK["responses"],
        openapi_extra=contract.TASK["openapi_extra"],
    )
    async def task(
        request: Request,
        round_key: Annotated[str, Path(pattern=ROUND)],
        device_id: Annotated[str, Query(pattern=ID)],
        x_fedfleet_ticket: Annotated[str, Header()],
        wait: Annotated[float, Query(ge=0, le=30)] = 10.0,
    ) -> Any:
        wrapped, route = routed(x_fedfleet_ticket, round_key, device_id)
        if route is None:
            return JSONResponse(_GONE | _window(rng, "round-ended"), status_code=410)
        try:
            query = urlencode({"device_id": device_id, "wait": wait})
            r = await client.request(
                "GET",
                route.address,
                f"/v1/tasks/{round_key}?{query}",
                headers={"x-fedfleet-ticket": wrapped.ticket},
                timeout=wait + 15.0,
            )
        except RelayError:
            return JSONResponse(_GONE | _window(rng, "round-ended"), status_code=410)
        relays.labels("task", str(r.status)).inc()
        if r.status != 200:
            return _relay(r)
        try:
            described = r.json()
            version = int(described["model_version"])
        except (ValueError, TypeError, KeyError):
            log.warning("unreadable task description", extra={"route": route.id})
            return JSONResponse(_GONE | _window(rng, "round-ended"), status_code=410)
        described["checkpoint_url"] = f"/v1/routes/{route.id}/checkpoints/{version}"
        return JSONResponse(described)

    @app.get(
        "/v1/routes/{route_id}/checkpoints/{version}",
        response_class=Response,
        responses=contract.CHECKPOINT["responses"],
        openapi_extra=contract.CHECKPOINT["openapi_extra"],
    )
    async def routed_checkpoint(
        request: Request,
        route_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")],
        version: Annotated[int, Path(ge=0)],
    ) -> Response:
        """The checkpoint of the job behind ``route_id`` (the task's ``checkpoint_url``)."""
        route = routes.get(route_id)
        if route is None:
            raise HTTPException(404, "no such route (the job ended or its selector moved)")
        try:
            r = await client.request(
                "GET",
                route.address,
                f"/v1/checkpoints/{version}",
                headers=device_headers(request),
                timeout=120.0,
            )
        except RelayError:
            return JSONResponse(
                {"detail": "the job's selector is unreachable; retry later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        relays.labels("checkpoint", str(r.status)).inc()
        return _relay(r)

    @app.get(
        "/v1/checkpoints/{version}",
        response_class=Response,
        include_in_schema=False,
    )
    async def checkpoint(version: Annotated[int, Path(ge=0)]) -> Response:
        raise HTTPException(
            404,
            "behind the population gateway a checkpoint belongs to a job: download it from "
            "the checkpoint_url of your task",
        )

    async def relay_body(
        request: Request,
        kind: str,
        path: str,
        round_key: str,
        device_id: str,
        ticket: str,
        limit_of: Callable[[Route], int],
    ) -> Response:
        wrapped, route = routed(ticket, round_key, device_id)
        if route is None:
            return JSONResponse(_GONE, status_code=410)
        limit = limit_of(route)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body exceeds {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(413, f"body exceeds {limit} bytes")
        try:
            r = await client.request(
                "POST",
                route.address,
                path,
                body=body,
                headers=device_headers(request, wrapped.ticket),
                timeout=60.0,
            )
        except RelayError:
            return JSONResponse(
                {"detail": "the job's selector is unreachable; retry later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        relays.labels(kind, str(r.status)).inc()
        return _relay(r)

    @app.post(
        "/v1/reports/{round_key}",
        status_code=202,
        responses=contract.REPORT["responses"],
        openapi_extra=contract.REPORT["openapi_extra"],
    )
    async def report(
        request: Request,
        round_key: Annotated[str, Path(pattern=ROUND)],
        x_fedfleet_device: Annotated[str, Header(pattern=ID)],
        x_fedfleet_ticket: Annotated[str, Header(min_length=1, max_length=256)],
    ) -> Any:
        return await relay_body(
            request,
            "report",
            f"/v1/reports/{round_key}",
            round_key,
            x_fedfleet_device,
            x_fedfleet_ticket,
            lambda r: r.report_limit,
        )

    @app.post(
        "/v1/secagg/{round_key}/{step}",
        responses=contract.SECAGG["responses"],
        openapi_extra=contract.SECAGG["openapi_extra"],
    )
    async def secagg(
        request: Request,
        round_key: Annotated[str, Path(pattern=ROUND)],
        step: Annotated[str, Path(pattern=SECAGG_STEP_PATTERN)],
        x_fedfleet_device: Annotated[str, Header(pattern=ID)],
        x_fedfleet_ticket: Annotated[str, Header(min_length=1, max_length=256)],
    ) -> Any:
        return await relay_body(
            request,
            "secagg",
            f"/v1/secagg/{round_key}/{step}",
            round_key,
            x_fedfleet_device,
            x_fedfleet_ticket,
            lambda r: r.secagg_limit,
        )

    @app.post(
        "/v1/aborts/{round_key}",
        status_code=202,
        responses=contract.ABORT["responses"],
        openapi_extra=contract.ABORT["openapi_extra"],
    )
    async def abort(
        request: Request,
        round_key: Annotated[str, Path(pattern=ROUND)],
        x_fedfleet_device: Annotated[str, Header(pattern=ID)],
        x_fedfleet_ticket: Annotated[str, Header(min_length=1, max_length=256)],
    ) -> Any:
        return await relay_body(
            request,
            "abort",
            f"/v1/aborts/{round_key}",
            round_key,
            x_fedfleet_device,
            x_fedfleet_ticket,
            lambda _: SMALL_JSON_LIMIT,
        )

    app.state.ticker = ticker
    app.state.routes = lambda: dict(routes)
    return app
