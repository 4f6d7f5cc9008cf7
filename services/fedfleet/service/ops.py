"""Operational surface of every service: health, readiness, metrics, JSON logs, ticking.

Each actor service runs its actor's ``tick`` on a background thread (store I/O there never
stalls request handling) and exposes ``/healthz`` (the process is alive and its tick thread
is running), ``/readyz`` (the last tick reached the store) and ``/metrics`` (Prometheus text).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fedfleet.store.base import StoreUnavailable
from fedfleet.store.events import Events

__all__ = ["JsonFormatter", "Ticker", "add_ops_routes", "configure_logging", "ticking_lifespan"]

log = logging.getLogger("fedfleet.service")

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", *, actor: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: a selector would write a line per forwarded report.
    # Its requests' failures are logged by the actors themselves; DEBUG still shows them all.
    logging.getLogger("httpx").setLevel(
        logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING
    )
    if actor:
        old = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = old(*args, **kwargs)
            record.actor = actor
            return record

        logging.setLogRecordFactory(factory)


class Ticker:
    """Calls ``fn(time.time())`` every ``interval`` seconds on a daemon thread.

    A store outage marks the ticker not ready (the service answers 503) and is retried with
    exponential backoff (the interval doubling up to ``max_backoff`` seconds), logged once
    when it starts and once when it ends; any other error is logged and the loop goes on —
    an actor never dies of one bad tick, and never hides one either.

    :meth:`poke` (and store events, :meth:`wake_on`) run the next tick at once: a burst of
    pokes during a tick costs one more tick, not one per poke. The interval stays the
    safety net for lost events, expiring leases and timeouts.
    """

    max_backoff = 1.0
    """Longest wait between ticks while the store is unreachable (seconds): short enough that
    a coordinator renews its lease soon after the store is back."""

    def __init__(self, name: str, fn: Callable[[float], None], interval: float) -> None:
        self.name = name
        self._fn = fn
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._listens: list[tuple[Events, str, tuple[str, ...], Callable[[], bool] | None]] = []
        self._unsubscribes: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name=f"tick-{name}", daemon=True)
        self.store_ok = False
        self.last_ok = 0.0
        self.last_error = ""
        self.ticks = 0

    def wake_on(
        self,
        events: Events,
        job: str,
        topics: Iterable[str],
        *,
        when: Callable[[], bool] | None = None,
    ) -> None:
        """Tick as soon as one of ``topics`` of ``job`` is announced (from :meth:`start` on);
        with ``when``, only while it returns true (a standby has nothing to do on a round's
        events: its timer is what takes the lease over)."""
        self._listens.append((events, job, tuple(topics), when))

    def poke(self, _topic: str = "") -> None:
        """Run the next tick now (or right after the current one); safe from any thread."""
        self._wake.set()

    def _poke_when(self, when: Callable[[], bool]) -> Callable[[str], None]:
        def poke(topic: str = "") -> None:
            if when():
                self.poke(topic)

        return poke

    def start(self) -> None:
        for events, job, topics, when in self._listens:
            poke = self.poke if when is None else self._poke_when(when)
            self._unsubscribes.append(events.subscribe(job, topics, poke))
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        while self._unsubscribes:
            self._unsubscribes.pop()()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._fn(time.time())
                if not self.store_ok:
                    log.info("store reachable", extra={"ticker": self.name})
                self.store_ok, self.last_ok, self.last_error = True, time.time(), ""
                wait = self.interval
            except StoreUnavailable as exc:
                if self.store_ok or not self.last_error:
                    log.warning("store unavailable", extra={"error": str(exc)})
                self.store_ok, self.last_error = False, str(exc)
                wait = min(max(2 * wait, self.interval), max(self.max_backoff, self.interval))
            except Exception as exc:
                self.last_error = repr(exc)
                log.exception("tick failed", extra={"ticker": self.name})
            self.ticks += 1
            self._wake.wait(max(0.0, wait - (time.monotonic() - started)))
            self._wake.clear()


def add_ops_routes(
    app: FastAPI,
    registry: CollectorRegistry,
    ticker: Ticker,
    *,
    status: Callable[[], dict[str, Any]] | None = None,
) -> None:
    up = Gauge("fedfleet_store_up", "1 when the last tick reached the store", registry=registry)
    up.set_function(lambda: 1.0 if ticker.store_ok else 0.0)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        if not ticker.alive:
            return JSONResponse({"status": "tick thread stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> Response:
        body: dict[str, Any] = {"store": ticker.store_ok, "error": ticker.last_error}
        if status is not None:
            body.update(status())
        code = 200 if ticker.store_ok and ticker.alive else 503
        headers = {} if code == 200 else {"Retry-After": "2"}
        return JSONResponse(body, status_code=code, headers=headers)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def ticking_lifespan(
    ticker: Ticker,
    logger: logging.Logger,
    what: str,
    cleanup: Callable[[], None],
    **extra: Any,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """An app lifespan: start the tick thread; on shutdown stop it, then ``cleanup()`` (leave
    the store: deregister, release a lease), which may find the store gone and says so."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ticker.start()
        logger.info(f"{what} started", extra=extra)
        try:
            yield
        finally:
            ticker.stop()
            try:
                cleanup()
            except StoreUnavailable:
                logger.warning(f"{what}: store unreachable while shutting down")
            logger.info(f"{what} stopped")

    return lifespan
