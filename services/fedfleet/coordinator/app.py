"""The Coordinator service: an active coordinator or a standby waiting for the lease.

It serves no device traffic — only health, readiness, metrics and a status document. Run two
replicas: the one that holds the lease drives the rounds; the other takes over when the lease
expires (or at once, when the active one shuts down gracefully and releases it).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Gauge

from fedfleet.coordinator.actor import AttemptEnd, Coordinator, CoordinatorSettings
from fedfleet.core.spec import FLJob
from fedfleet.service.gate import install
from fedfleet.service.ops import Ticker, add_ops_routes, ticking_lifespan
from fedfleet.service.telemetry import CoordinatorMetrics, timed_store
from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.events import COMMITS, COUNTS, PARTIALS, REPORTS, events_of, publishing

__all__ = ["create_app"]

log = logging.getLogger("fedfleet.coordinator")


def create_app(
    job: FLJob,
    store: Store,
    *,
    actor_id: str,
    tick_seconds: float = 0.5,
    lease_ttl: float = 10.0,
    active_since: float | None = None,
) -> FastAPI:
    registry = CollectorRegistry()
    observed = CoordinatorMetrics(registry, job)

    def attempt_ended(end: AttemptEnd) -> None:
        observed.attempt_ended(end)
        log.info(
            "attempt ended",
            extra={
                "round": end.round,
                "attempt": end.attempt,
                "abandoned": end.abandoned,
                "reason": end.reason,
                "selected": end.selected,
                "reported": end.reported,
                "accuracy": end.metrics.get("accuracy"),
            },
        )

    store = publishing(store)
    coordinator = Coordinator(
        job,
        timed_store(store, registry),
        actor_id=actor_id,
        settings=CoordinatorSettings(
            lease_ttl=lease_ttl,
            commit_timeout=max(10.0, 6 * tick_seconds),
            active_since=active_since,
        ),
        on_attempt_end=attempt_ended,
    )

    def tick(now: float) -> None:
        try:
            coordinator.tick(now)
            if coordinator.tick_again:
                coordinator.tick_again = False
                ticker.poke()
        finally:
            observed.job_state(coordinator.job_state if coordinator.is_leader else None)

    ticker = Ticker(f"coordinator-{actor_id}", tick, tick_seconds)
    # Selections and drop-outs counted, reports taken, partial sums (or a refusal) published,
    # a commit: each may move a round on (for the leader: a standby's timer takes the lease).
    ticker.wake_on(
        events_of(store),
        job.key,
        (COUNTS, REPORTS, PARTIALS, COMMITS),
        when=lambda: coordinator.is_leader,
    )
    Gauge(
        "fedfleet_coordinator_leader", "1 while this replica holds the job lease", registry=registry
    ).set_function(lambda: 1.0 if coordinator.is_leader else 0.0)

    def status() -> dict[str, Any]:
        return {"actor": actor_id, "leader": coordinator.is_leader}

    lifespan = ticking_lifespan(ticker, log, "coordinator", coordinator.step_down, job=job.key)

    app = FastAPI(title="fedfleet coordinator", version="1", lifespan=lifespan)
    app.state.coordinator = coordinator
    install(app, [])  # no route takes a body
    app.state.ticker = ticker
    add_ops_routes(app, registry, ticker, status=status)

    @app.get("/v1/status")
    def job_status() -> dict[str, Any]:
        try:
            state = store.job_state(job.key)
            history = store.metrics(job.key)
        except StoreUnavailable as exc:
            return {"error": str(exc), **status()}
        return {**status(), "job": job.name, "state": state, "metrics": history[-5:]}

    return app
