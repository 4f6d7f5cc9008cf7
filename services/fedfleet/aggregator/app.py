"""The Aggregator service: selectors hand it reports; it folds them in and, as a round's
master, commits. Its API is internal (``/internal/v1``), authenticated with the job's
internal token, and never exposed to devices.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter

from fedfleet.aggregator.actor import Aggregator, Evaluator
from fedfleet.core.metrics import MetricsRejected, parse_metrics
from fedfleet.core.protocol import (
    SECAGG_STEP_PATTERN,
    ReportEnvelope,
    ReportRejected,
    secagg_message_limit,
)
from fedfleet.core.roles import Role
from fedfleet.core.spec import FLJob
from fedfleet.service.gate import Door, Refusal, Seen, bearer, install
from fedfleet.service.keys import JobKeys
from fedfleet.service.ops import Ticker, add_ops_routes, ticking_lifespan
from fedfleet.service.telemetry import (
    fold_seconds_histogram,
    timed_store,
    update_size_histogram,
)
from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.events import PARTIALS, ROUNDS, events_of, publishing

__all__ = ["create_app", "dataset_evaluator", "internal_doors"]

log = logging.getLogger("fedfleet.aggregator")


def dataset_evaluator(job: FLJob) -> Evaluator | None:
    """Server-side evaluation with the job's task on its held-out examples (None: the
    manifest names none). Raises ``TaskError``/``DataError`` naming the field if they do not
    fit the task."""
    from fedfleet.device.datasets import load_evaluation
    from fedfleet.tasks import check_data, task_of
    from fedfleet.tasks.evaluation import task_evaluator

    test = load_evaluation(job.spec.fleet, job.spec.evaluation)
    if test is None:
        return None
    loaded = task_of(job)
    where = "spec.evaluation.data" if job.spec.evaluation.data else "spec.fleet"
    check_data(loaded, test, where)
    return task_evaluator(loaded, test)


def internal_doors(job: FLJob, keys: JobKeys) -> list[Door]:
    """Every body-carrying route needs the job's internal token, checked before the body."""

    def check(seen: Seen) -> Refusal | None:
        token = bearer(seen.headers)
        if token is None or not keys.internal_ok(token):
            return Refusal(401, "invalid internal token")
        return None

    agg = job.spec.aggregation
    return [
        Door("POST", re.compile(r"/internal/v1/reports/[^/]+"), agg.max_update_bytes, check),
        Door(
            "POST", re.compile(r"/internal/v1/secagg/[^/]+/[^/]+"), secagg_message_limit(agg), check
        ),
    ]


def create_app(
    job: FLJob,
    store: Store,
    keys: JobKeys,
    *,
    actor_id: str,
    address: str,
    tick_seconds: float = 0.5,
    evaluator: Evaluator | None = None,
) -> FastAPI:
    registry = CollectorRegistry()
    reports = Counter(
        "fedfleet_aggregated_reports", "Reports by HTTP status", ["status"], registry=registry
    )
    update_size = update_size_histogram(registry, job)
    store = publishing(timed_store(store, registry))
    aggregator = Aggregator(
        job, store, actor_id=actor_id, secret=keys.ticket_key, evaluator=evaluator, address=address
    )
    aggregator.fold_observer = fold_seconds_histogram(registry, job)
    ticker = Ticker(f"aggregator-{actor_id}", aggregator.tick, tick_seconds)
    aggregator.wake = ticker.poke
    # A round closing (publish the partial sum) and, on the master, partial sums arriving.
    ticker.wake_on(events_of(store), job.key, (ROUNDS, PARTIALS))

    lifespan = ticking_lifespan(
        ticker,
        log,
        "aggregator",
        lambda: store.deregister(job.key, Role.aggregator, actor_id),
        job=job.key,
        address=address,
    )

    app = FastAPI(title="fedfleet aggregator (internal)", version="1", lifespan=lifespan)
    app.state.aggregator = aggregator
    app.state.ticker = ticker
    install(app, internal_doors(job, keys))
    add_ops_routes(
        app,
        registry,
        ticker,
        status=lambda: {"actor": actor_id, "last_commit_error": aggregator.last_commit_error},
    )

    @app.post("/internal/v1/reports/{round_key}", status_code=202)
    async def accept(
        request: Request,
        round_key: Annotated[str, Path(pattern=r"^a[0-9]{1,18}$")],
        authorization: Annotated[str, Header()],
        x_fedfleet_device: Annotated[str, Header(min_length=1, max_length=128)],
        x_fedfleet_ticket: Annotated[str, Header(min_length=1, max_length=128)],
        x_fedfleet_examples: Annotated[int, Header(ge=1)],
        x_fedfleet_metrics: Annotated[str | None, Header(max_length=4096)] = None,
    ) -> Any:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not keys.internal_ok(token.strip()):
            raise HTTPException(401, "invalid internal token")
        body = await request.body()
        update_size(len(body))
        try:
            metrics = parse_metrics(x_fedfleet_metrics) if x_fedfleet_metrics else {}
        except MetricsRejected as exc:
            raise HTTPException(422, f"x-fedfleet-metrics: {exc}") from None
        env = ReportEnvelope(
            x_fedfleet_device, round_key, x_fedfleet_ticket, x_fedfleet_examples, body, metrics
        )
        try:
            await run_in_threadpool(aggregator.accept, env)
        except ReportRejected as exc:
            reports.labels(str(exc.status)).inc()
            raise HTTPException(exc.status, exc.reason) from None
        except StoreUnavailable:
            reports.labels("503").inc()
            raise HTTPException(
                503, "the shared store is unreachable", {"Retry-After": "5"}
            ) from None
        reports.labels("202").inc()
        return {"status": "accepted"}

    @app.post(
        "/internal/v1/secagg/{round_key}/{step}",
        responses={202: {"description": "Not published yet: poll again"}},
    )
    async def secagg(
        request: Request,
        round_key: Annotated[str, Path(pattern=r"^a[0-9]{1,18}$")],
        step: Annotated[str, Path(pattern=SECAGG_STEP_PATTERN)],
        authorization: Annotated[str, Header()],
        x_fedfleet_device: Annotated[str, Header(min_length=1, max_length=128)],
        x_fedfleet_ticket: Annotated[str, Header(min_length=1, max_length=128)],
    ) -> Any:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not keys.internal_ok(token.strip()):
            raise HTTPException(401, "invalid internal token")
        body = await request.body()
        try:
            answer = await run_in_threadpool(
                aggregator.secagg, round_key, x_fedfleet_device, x_fedfleet_ticket, step, body
            )
        except ReportRejected as exc:
            raise HTTPException(exc.status, exc.reason) from None
        except StoreUnavailable:
            raise HTTPException(
                503, "the shared store is unreachable", {"Retry-After": "5"}
            ) from None
        if answer is None:
            return JSONResponse({"detail": "not published yet"}, status_code=202)
        return answer

    return app
