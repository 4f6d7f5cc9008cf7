"""The Selector service: the device API (``/v1``) over the Selector actor.

Devices authenticate every check-in with a bearer credential issued at enrollment
(:mod:`fedfleet.selector.enroll_routes`; or a job token, :mod:`fedfleet.selector.credentials`),
for the device named in ``x-fedfleet-device``, and every later call with their report ticket;
both are checked from the headers before any body is read, and every body is bounded while it
streams (:mod:`fedfleet.selector.doors`, :mod:`fedfleet.service.gate`). A check-in is decided
in memory (no store round trip): either a reconnect window, or a selection whose plan
the device then long-polls for at ``/v1/tasks/{round}``. The checkpoint is downloaded from
``/v1/checkpoints/{version}`` with the device's token (immutable, privately cacheable by
version); the update is uploaded as a
binary body to ``/v1/reports/{round}`` and handed to the device's aggregator. Under Secure
Aggregation the update never travels as such: the device walks the protocol's steps at
``/v1/secagg/{round}/{step}``, which the selector relays to the device's aggregator.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, Literal

import httpx
from fastapi import FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json

from fedfleet.core.metrics import MetricsRejected, parse_metrics
from fedfleet.core.protocol import (
    SECAGG_STEP_PATTERN,
    CheckIn,
    Reconnect,
    ReportEnvelope,
    ReportRejected,
    Task,
    secagg_message_limit,
)
from fedfleet.core.roles import Role
from fedfleet.core.spec import FLJob, PlanSpec
from fedfleet.gateway.routes import Route, announce, route_scope, withdraw
from fedfleet.http11 import Http11Client, HttpError
from fedfleet.selector import contract
from fedfleet.selector.actor import Selector
from fedfleet.selector.doors import ID, ROUND, device_doors
from fedfleet.selector.enroll_routes import (
    EnrollmentSettings,
    add_enroll_routes,
    device_auth,
    enroll_doors,
)
from fedfleet.service.gate import Door, Refusal, Seen, install
from fedfleet.service.keys import JobKeys
from fedfleet.service.ops import Ticker, add_ops_routes, ticking_lifespan
from fedfleet.service.telemetry import JOB_LABELS, job_labels, timed_store
from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.events import QUOTAS, ROUNDS, events_of, publishing

__all__ = ["CheckInRequest", "CheckInResponse", "TaskResponse", "create_app"]

log = logging.getLogger("fedfleet.selector")


class CheckInRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    device_id: str = Field(pattern=ID, description="The device's enrolled identity.")
    population: str = Field(min_length=1, max_length=253)
    charging: bool
    unmetered: bool
    idle: bool
    num_examples: int = Field(ge=0, le=10_000_000)


class CheckInResponse(BaseModel):
    outcome: Literal["selected", "reconnect"]
    round_key: str | None = None
    ticket: str | None = Field(None, description="Present it with the task poll and the report.")
    aggregator: str | None = None
    reconnect_after_s: float | None = Field(None, description="Come back no sooner than this.")
    reconnect_within_s: float | None = Field(None, description="...and no later than this.")
    reason: str | None = None


class TaskResponse(BaseModel):
    round_key: str
    model_version: int
    checkpoint_url: str
    task: contract.TaskDescription = Field(
        description="The task to run (`ref`, `config`); a device refuses one it does not have."
    )
    plan: PlanSpec = Field(
        description="Local training: epochs, minibatch size, learning rate, FedProx term."
    )
    evaluate: bool = Field(
        False,
        description="Federated evaluation: also evaluate the checkpoint on the device's "
        "examples and report the metrics as `federated_<name>`.",
    )
    aggregator: str
    privacy: contract.PrivacyDescription | None = Field(
        None,
        description="What the device does to its update before it leaves the device "
        "(capped weight, DP clipping, Secure Aggregation group); null when neither is on.",
    )


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(pattern=ID)
    reason: str = Field("eligibility-lost", max_length=200)


class _Pending:
    """A selected device's held connection: the tick thread configures or releases it."""

    __slots__ = ("event", "last_seen", "loop", "released", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.task: Task | None = None
        self.released: Reconnect | None = None
        self.last_seen = time.monotonic()

    def configure(self, task: Task) -> None:
        self.task = task
        self.loop.call_soon_threadsafe(self.event.set)

    def release(self, reconnect: Reconnect) -> None:
        self.released = reconnect
        self.loop.call_soon_threadsafe(self.event.set)


def _reconnect_body(r: Reconnect, now: float) -> CheckInResponse:
    return CheckInResponse(
        outcome="reconnect",
        reconnect_after_s=round(max(0.0, r.not_before - now), 3),
        reconnect_within_s=round(max(0.0, r.not_after - now), 3),
        reason=r.reason,
    )


def _counting_refusals(door: Door, count: Callable[[], None]) -> Door:
    """The check-in door, counting each check-in it refuses (other doors unchanged)."""
    check = door.check
    if door.path.pattern != "/v1/checkin" or check is None:
        return door

    def counted(seen: Seen) -> Refusal | None:
        refusal = check(seen)
        if refusal is not None:
            count()
        return refusal

    return replace(door, check=counted)


def create_app(
    job: FLJob,
    store: Store,
    keys: JobKeys,
    *,
    actor_id: str,
    address: str,
    tick_seconds: float = 0.5,
    liveness_seconds: float = 30.0,
    population_secret: bytes | None = None,
    enrollment: EnrollmentSettings | None = None,
) -> FastAPI:
    """Build the Selector service; the tick thread starts with the app's lifespan. With
    ``population_secret`` it enrolls devices of the job's population (enroll_routes.py)."""
    registry = CollectorRegistry()
    checkins = Counter(
        "fedfleet_checkins",
        "Check-ins by answer: selected, reconnect (a window to come back in), refused (bad "
        "credentials, or a device over its rate), unavailable (store unreachable)",
        [*JOB_LABELS, "outcome"],
        registry=registry,
    )
    checkin_reconnect, checkin_selected, checkin_unavailable, checkin_refused = (
        checkins.labels(**job_labels(job), outcome=answer)
        for answer in ("reconnect", "selected", "unavailable", "refused")
    )
    store = publishing(timed_store(store, registry))
    reports = Counter("fedfleet_reports", "Reports by HTTP status", ["status"], registry=registry)
    aggregators: dict[str, str] = {}
    client = httpx.Client(
        timeout=httpx.Timeout(30.0, connect=2.0), limits=httpx.Limits(max_connections=64)
    )

    def address_of(aggregator_id: str, round_key: str) -> str:
        addr = aggregators.get(aggregator_id)
        if addr is not None:
            return addr
        if selector.round_state(round_key) is None:
            # Neither the round nor the aggregator is known here: the device is mistaken (or
            # forging), not waiting out an outage, so the answer must not invite a retry.
            raise ReportRejected(404, "unknown round or aggregator")
        raise ConnectionError(f"aggregator {aggregator_id} is not registered")

    # Uploads are forwarded from the event loop over keep-alive connections (fedfleet.http11):
    # a blocking client in a worker thread cost the selector a thread hop and httpx's own
    # machinery per upload, a sixth of its CPU in a 500-report round (bench/up_large.py).
    uploads = Http11Client(connect_timeout=2.0, max_connections=64, queue_timeout=30.0)

    async def forward(aggregator_id: str, env: ReportEnvelope) -> None:
        addr = address_of(aggregator_id, env.round_key)
        headers = {
            "authorization": f"Bearer {keys.internal_token}",
            "x-fedfleet-device": env.device_id,
            "x-fedfleet-ticket": env.ticket,
            "x-fedfleet-examples": str(env.num_examples),
            "x-fedfleet-metrics": json.dumps(env.metrics),
            "content-type": "application/octet-stream",
        }
        try:
            r = await uploads.request(
                "POST",
                addr,
                f"/internal/v1/reports/{env.round_key}",
                headers=headers,
                body=env.update,
                timeout=30.0,
                limit=64 * 1024,
            )
        except HttpError as exc:
            raise ConnectionError(f"aggregator {aggregator_id} unreachable: {exc}") from exc
        if r.status != 202:
            try:
                answer = r.json()
                detail = str(answer.get("detail", r.text)) if isinstance(answer, dict) else r.text
            except ValueError:
                detail = r.text
            raise ReportRejected(r.status, detail)

    def forward_secagg(
        aggregator_id: str, round_key: str, device_id: str, ticket: str, step: str, body: bytes
    ) -> dict[str, Any] | None:
        addr = address_of(aggregator_id, round_key)
        headers = {
            "authorization": f"Bearer {keys.internal_token}",
            "x-fedfleet-device": device_id,
            "x-fedfleet-ticket": ticket,
            "content-type": "application/octet-stream",
        }
        try:
            r = client.post(
                f"{addr}/internal/v1/secagg/{round_key}/{step}", content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            raise ConnectionError(f"aggregator {aggregator_id} unreachable: {exc}") from exc
        if r.status_code == 202:
            return None
        try:
            answer = r.json()
        except ValueError:
            answer = {"detail": r.text}
        if r.status_code != 200 or not isinstance(answer, dict):
            detail = answer.get("detail", r.text) if isinstance(answer, dict) else r.text
            raise ReportRejected(r.status_code, str(detail))
        return answer

    selector = Selector(
        job,
        store,
        actor_id=actor_id,
        secret=keys.ticket_key,
        aforward=forward,
        forward_secagg=forward_secagg,
        address=address,
    )
    auth = device_auth(keys, job.spec.population, population_secret, enrollment)
    pending: dict[tuple[str, str], _Pending] = {}
    pending_lock = threading.Lock()
    Gauge(
        "fedfleet_selected_waiting", "Selected devices waiting for a plan", registry=registry
    ).set_function(lambda: float(len(pending)))

    unsettled: list[tuple[str, str]] = []
    scope = "" if population_secret is None else route_scope(job.spec.population, population_secret)
    route = (
        None
        if population_secret is None
        else Route(
            job=job.key,
            actor=actor_id,
            address=address,
            priority=job.spec.scheduling.priority,
            weight=job.spec.scheduling.weight,
            open=False,
            report_limit=job.spec.aggregation.max_update_bytes,
            secagg_limit=secagg_message_limit(job.spec.aggregation),
        )
    )

    def tick(now: float) -> None:
        nonlocal aggregators
        selector.tick(now)
        # Swap in a whole new map: a report forwarded meanwhile sees the old one, never an
        # empty one; if the store fails, the last known map stays.
        aggregators = dict(store.members(job.key, Role.aggregator))
        auth.refresh(store)  # revocations take effect within a tick
        if route is not None:  # tell the population's gateway whether this round has room
            announce(store, scope, replace(route, open=selector.has_room()))
        cutoff = time.monotonic() - liveness_seconds
        with pending_lock:
            lost = [k for k, p in pending.items() if p.last_seen < cutoff]
            for k in lost:
                del pending[k]
        unsettled.extend(lost)
        while unsettled:  # a drop the store could not record yet is retried next tick
            round_key, device_id = unsettled[0]
            selector.dropped(round_key, device_id)
            unsettled.pop(0)

    ticker = Ticker(f"selector-{actor_id}", tick, tick_seconds)
    # A round opened or configured, a quota changed: answer held devices and select at once.
    ticker.wake_on(events_of(store), job.key, (ROUNDS, QUOTAS))
    selector.wake = ticker.poke

    def leave() -> None:
        try:
            if route is not None:
                withdraw(store, scope, job.key, actor_id)
            store.deregister(job.key, Role.selector, actor_id)
        finally:
            client.close()
            uploads.close()

    lifespan = ticking_lifespan(ticker, log, "selector", leave, job=job.key, address=address)

    app = FastAPI(
        title="fedfleet device API",
        version="1",
        lifespan=lifespan,
        description="Check-in, plan and checkpoint download, report upload (Bonawitz et al. 2019).",
    )
    contract.document(app)
    app.state.selector = selector
    app.state.ticker = ticker
    install(
        app,
        [
            *(
                _counting_refusals(d, checkin_refused.inc)
                for d in device_doors(job, auth, selector.ticket_ok)
            ),
            *enroll_doors(auth, enrollment),
        ],
    )
    add_enroll_routes(app, auth, store, enrollment)
    add_ops_routes(
        app, registry, ticker, status=lambda: {"actor": actor_id, "waiting": len(pending)}
    )

    def unavailable() -> JSONResponse:
        return JSONResponse(
            {"detail": "the shared store is unreachable; retry later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    def authenticate(authorization: str | None, device_id: str) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not auth.ok(device_id, token.strip()):
            raise HTTPException(
                401, "missing or invalid device token", {"WWW-Authenticate": "Bearer"}
            )

    def ticketed(round_key: str, device_id: str, ticket: str) -> None:
        if not selector.ticket_ok(round_key, device_id, ticket):
            raise HTTPException(403, "invalid ticket for this device and round")

    # The hot path at scale: most check-ins end in a reconnect window. Reading the header from
    # the request (FastAPI re-inspects a Header() parameter on every call) and writing the
    # reconnect JSON directly (instead of building and re-validating a response model) keep it
    # close to a bare endpoint; the OpenAPI document still describes both (selector.contract).
    @app.post(
        "/v1/checkin",
        response_model=CheckInResponse,
        response_model_exclude_none=True,
        responses=contract.CHECKIN["responses"],
        openapi_extra=contract.CHECKIN["openapi_extra"],
    )
    async def check_in(body: CheckInRequest, request: Request) -> Any:
        # The gate checked the token for the x-fedfleet-device header before the body was
        # read; checking it again for the body's device_id binds the two together.
        try:
            authenticate(request.headers.get("authorization"), body.device_id)
        except HTTPException:
            checkin_refused.inc()
            raise
        if not ticker.store_ok:
            checkin_unavailable.inc()
            return unavailable()
        now = time.time()
        link = _Pending(asyncio.get_running_loop())
        answer = selector.check_in(
            CheckIn(
                body.device_id,
                body.population,
                body.charging,
                body.unmetered,
                body.idle,
                body.num_examples,
            ),
            now,
            link,
        )
        if isinstance(answer, Reconnect):
            checkin_reconnect.inc()
            return Response(
                to_json(
                    {
                        "outcome": "reconnect",
                        "reconnect_after_s": round(max(0.0, answer.not_before - now), 3),
                        "reconnect_within_s": round(max(0.0, answer.not_after - now), 3),
                        "reason": answer.reason,
                    }
                ),
                media_type="application/json",
            )
        checkin_selected.inc()
        with pending_lock:
            pending.setdefault((answer.round_key, body.device_id), link)
        return CheckInResponse(
            outcome="selected",
            round_key=answer.round_key,
            ticket=answer.ticket,
            aggregator=answer.aggregator,
        )

    @app.get(
        "/v1/tasks/{round_key}",
        response_model=TaskResponse,
        responses=contract.TASK["responses"],
        openapi_extra=contract.TASK["openapi_extra"],
    )
    async def task(
        round_key: Annotated[str, Path(pattern=ROUND)],
        device_id: Annotated[str, Query(pattern=ID)],
        x_fedfleet_ticket: Annotated[str, Header()],
        wait: Annotated[float, Query(ge=0, le=30)] = 10.0,
    ) -> Any:
        ticketed(round_key, device_id, x_fedfleet_ticket)
        with pending_lock:
            link = pending.get((round_key, device_id))
        if link is None:
            raise HTTPException(404, "no selection held for this device and round")
        link.last_seen = time.monotonic()
        if not link.event.is_set():
            try:
                await asyncio.wait_for(link.event.wait(), timeout=wait)
            except TimeoutError:
                link.last_seen = time.monotonic()
                return JSONResponse({"detail": "waiting for the round to start"}, status_code=202)
        with pending_lock:
            pending.pop((round_key, device_id), None)
        if link.task is None:
            r = link.released or Reconnect(time.time() + 5, time.time() + 15, "round-ended")
            return JSONResponse(
                _reconnect_body(r, time.time()).model_dump(exclude_none=True), status_code=410
            )
        t = link.task
        return TaskResponse(
            round_key=round_key,
            model_version=t.model_version,
            checkpoint_url=f"/v1/checkpoints/{t.model_version}",
            task=t.task.model_dump(mode="json", include={"ref", "config"}),
            plan=t.plan.model_dump(by_alias=True, mode="json"),
            evaluate=t.evaluate,
            aggregator=t.assignment.aggregator,
            privacy=None if t.privacy is None else t.privacy.to_dict(),
        )

    @app.get(
        "/v1/checkpoints/{version}",
        response_class=Response,
        responses=contract.CHECKPOINT["responses"],
        openapi_extra=contract.CHECKPOINT["openapi_extra"],
    )
    def checkpoint(
        version: Annotated[int, Path(ge=0)],
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Response:
        # The gate (doors.py) refused any request without a valid token for x-fedfleet-device.
        etag = f'"v{version}"'
        # private: a shared cache (a proxy in front of the selectors) must not serve the model
        # to a client that did not authenticate.
        headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
        if if_none_match == etag:
            return Response(status_code=304, headers=headers)
        try:
            _, data = selector.checkpoint(version)
        except ValueError as exc:
            raise HTTPException(404, str(exc)) from None
        except StoreUnavailable:
            return unavailable()
        return Response(data, media_type="application/octet-stream", headers=headers)

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
        x_fedfleet_ticket: Annotated[str, Header(min_length=1, max_length=128)],
        x_fedfleet_examples: Annotated[int, Header(ge=1)],
        x_fedfleet_aggregator: Annotated[str, Header(pattern=ID)],
        content_length: Annotated[int | None, Header()] = None,
        x_fedfleet_metrics: Annotated[
            str | None,
            Header(
                max_length=4096,
                description="Optional JSON object of the device's metrics (name: number).",
            ),
        ] = None,
    ) -> Any:
        limit = job.spec.aggregation.max_update_bytes
        if content_length is not None and content_length > limit:
            reports.labels("413").inc()
            raise HTTPException(413, f"update exceeds {limit} bytes")
        ticketed(round_key, x_fedfleet_device, x_fedfleet_ticket)
        body = await request.body()
        if len(body) > limit:
            reports.labels("413").inc()
            raise HTTPException(413, f"update exceeds {limit} bytes")
        try:
            metrics = parse_metrics(x_fedfleet_metrics) if x_fedfleet_metrics else {}
        except MetricsRejected as exc:
            reports.labels("422").inc()
            raise HTTPException(422, f"x-fedfleet-metrics: {exc}") from None
        env = ReportEnvelope(
            x_fedfleet_device, round_key, x_fedfleet_ticket, x_fedfleet_examples, body, metrics
        )
        try:
            await selector.areport(env, x_fedfleet_aggregator)
        except ReportRejected as exc:
            reports.labels(str(exc.status)).inc()
            raise HTTPException(exc.status, exc.reason) from None
        except ConnectionError as exc:
            reports.labels("503").inc()
            raise HTTPException(
                503, f"aggregator unavailable: {exc}", {"Retry-After": "5"}
            ) from None
        reports.labels("202").inc()
        return {"status": "accepted"}

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
        x_fedfleet_ticket: Annotated[str, Header(min_length=1, max_length=128)],
        x_fedfleet_aggregator: Annotated[str, Header(pattern=ID)],
        content_length: Annotated[int | None, Header()] = None,
        x_fedfleet_metrics: Annotated[
            str | None,
            Header(
                max_length=4096,
                description="Optional JSON object of the device's metrics (name: number).",
            ),
        ] = None,
    ) -> Any:
        """One step of a Secure Aggregation session (Bonawitz et al., CCS 2017).

        Sends (advertise, shares, unmask: JSON; masked: the raw ring elements) answer 200 when
        taken; polls (roster, inbox, survivors: empty body) answer 200 with the published
        message, or 202 until it is published.
        """
        limit = secagg_message_limit(job.spec.aggregation)
        if content_length is not None and content_length > limit:
            raise HTTPException(413, f"message exceeds {limit} bytes")
        ticketed(round_key, x_fedfleet_device, x_fedfleet_ticket)
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(413, f"message exceeds {limit} bytes")
        try:
            answer = await run_in_threadpool(
                selector.secagg,
                x_fedfleet_aggregator,
                round_key,
                x_fedfleet_device,
                x_fedfleet_ticket,
                step,
                body,
            )
        except ReportRejected as exc:
            raise HTTPException(exc.status, exc.reason) from None
        except ConnectionError as exc:
            raise HTTPException(
                503, f"aggregator unavailable: {exc}", {"Retry-After": "5"}
            ) from None
        if answer is None:
            return JSONResponse({"detail": "not published yet"}, status_code=202)
        return answer

    @app.post(
        "/v1/aborts/{round_key}",
        status_code=202,
        responses=contract.ABORT["responses"],
        openapi_extra=contract.ABORT["openapi_extra"],
    )
    async def abort(
        round_key: Annotated[str, Path(pattern=ROUND)],
        body: AbortRequest,
        x_fedfleet_ticket: Annotated[str, Header()],
        x_fedfleet_device: Annotated[str, Header(pattern=ID)],
    ) -> Any:
        if body.device_id != x_fedfleet_device:
            raise HTTPException(403, "device_id differs from x-fedfleet-device")
        ticketed(round_key, body.device_id, x_fedfleet_ticket)
        with pending_lock:
            pending.pop((round_key, body.device_id), None)
        try:
            # Recorded in the store, so that no aggregator takes a report from it afterwards.
            await run_in_threadpool(selector.dropped, round_key, body.device_id)
        except StoreUnavailable:
            return unavailable()
        return {"status": "noted"}

    return app
