"""Store events: wake an actor the moment shared state it waits on changes.

Actors read the store on a timer (their tick). Waiting a tick at every step of a round — the
K-th report landing, the round closing, partial sums arriving, the master's commit, the next
round being configured, a quota changing — made a deployed round cost several ticks of pure
waiting. Here a write through :class:`PublishingStore` announces a **topic** of its job, and
an actor subscribed to that topic ticks at once (:meth:`fedfleet.service.ops.Ticker.wake_on`).

An event carries no data: it only says "look again". Every decision is still taken from what
the store holds, so a lost, late, duplicated or forged event costs at most one tick (the timer
stays, as the safety net for lost events, lease expiry and timeouts), never correctness.

Both stores offer the same hub through ``store.events()``: the memory store an in-process
:class:`LocalEvents` (callbacks run in the writer's thread), the Redis store a pub/sub hub
(:mod:`fedfleet.store.redis_events`, one channel per job and topic). A store without one gets
a process-local hub from :func:`events_of`, so wiring is the same everywhere.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

from fedfleet.core.protocol import Quota, RoundState
from fedfleet.store.base import Claim, Store

__all__ = [
    "COMMITS",
    "COUNTS",
    "PARTIALS",
    "QUOTAS",
    "REPORTS",
    "ROUNDS",
    "TOPICS",
    "Events",
    "LocalEvents",
    "PublishingStore",
    "events_of",
    "publishing",
]

ROUNDS = "rounds"
"""A round attempt's state was written (opened, configured, closing, ended)."""
QUOTAS = "quotas"
"""Selector quotas were written."""
COUNTS = "counts"
"""A per-attempt counter grew (selections, drop-outs, a refused commit)."""
REPORTS = "reports"
"""A report took one of an attempt's K slots, or a selected device aborted."""
PARTIALS = "partials"
"""An aggregator published its partial sum (or a failure) for a closing attempt."""
COMMITS = "commits"
"""A checkpoint was committed."""
TOPICS = (ROUNDS, QUOTAS, COUNTS, REPORTS, PARTIALS, COMMITS)

Callback = Callable[[str], None]
"""Called with the topic; must be quick and must not block (it runs on the hub's thread)."""


class Events(Protocol):
    def publish(self, job: str, topic: str) -> None:
        """Announce ``topic`` of ``job``; never raises, never blocks for long."""
        ...

    def subscribe(self, job: str, topics: Iterable[str], callback: Callback) -> Callable[[], None]:
        """Call ``callback(topic)`` for each announcement until the returned function is
        called. After a connection loss the hub calls it once per topic (it may have missed
        some)."""
        ...

    def close(self) -> None: ...


class LocalEvents:
    """In-process hub: ``publish`` calls the subscribers' callbacks in the caller's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[tuple[str, str], list[Callback]] = defaultdict(list)

    def publish(self, job: str, topic: str) -> None:
        with self._lock:
            callbacks = list(self._subs.get((job, topic), ()))
        for callback in callbacks:
            try:
                callback(topic)
            except Exception:  # a subscriber's bug must not fail the writer's store call
                pass

    def subscribe(self, job: str, topics: Iterable[str], callback: Callback) -> Callable[[], None]:
        keys = [(job, t) for t in topics]
        with self._lock:
            for key in keys:
                self._subs[key].append(callback)

        def unsubscribe() -> None:
            with self._lock:
                for key in keys:
                    subs = self._subs.get(key)
                    if subs is not None and callback in subs:
                        subs.remove(callback)

        return unsubscribe

    def close(self) -> None:
        with self._lock:
            self._subs.clear()


_fallback = LocalEvents()


def events_of(store: Any) -> Events:
    """The store's event hub (``store.events()``), else a process-local one (also when the
    store cannot give its hub now: events only save ticks, so the actor carries on)."""
    factory = getattr(store, "events", None)
    if callable(factory):
        try:
            return cast(Events, factory())
        except Exception:
            return _fallback
    return _fallback


class PublishingStore:
    """``store`` whose writes announce their topic on ``events`` after they succeeded.

    Only writes that someone waits on publish; a claim publishes only when it took a slot or
    recorded an abort. Everything else passes through unchanged.
    """

    def __init__(self, store: Store, events: Events) -> None:
        self._store = store
        self._events = events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def events(self) -> Events:
        return self._events

    def put_round(self, job: str, token: int, state: RoundState) -> None:
        self._store.put_round(job, token, state)
        self._events.publish(job, ROUNDS)

    def put_quotas(self, job: str, token: int, quotas: dict[str, Quota]) -> None:
        self._store.put_quotas(job, token, quotas)
        self._events.publish(job, QUOTAS)

    def add_count(self, job: str, round_key: str, kind: str, actor_id: str, n: int) -> None:
        self._store.add_count(job, round_key, kind, actor_id, n)
        self._events.publish(job, COUNTS)

    def claim_report(
        self, job: str, round_key: str, aggregator_id: str, goal: int, device_id: str
    ) -> Claim:
        claim = self._store.claim_report(job, round_key, aggregator_id, goal, device_id)
        if claim is Claim.taken:
            self._events.publish(job, REPORTS)
        return claim

    def claim_abort(self, job: str, round_key: str, device_id: str) -> bool:
        recorded = self._store.claim_abort(job, round_key, device_id)
        if recorded:
            self._events.publish(job, REPORTS)
        return recorded

    def put_partial(self, job: str, round_key: str, aggregator_id: str, data: bytes) -> None:
        self._store.put_partial(job, round_key, aggregator_id, data)
        self._events.publish(job, PARTIALS)

    def commit_checkpoint(
        self,
        job: str,
        token: int,
        expected_version: int,
        round_: int,
        data: bytes,
        metrics: dict[str, Any],
    ) -> int:
        version = self._store.commit_checkpoint(job, token, expected_version, round_, data, metrics)
        self._events.publish(job, COMMITS)
        return version


def publishing(store: Store) -> Store:
    """``store`` announcing its writes on its own hub (:func:`events_of`)."""
    if isinstance(store, PublishingStore):
        return cast(Store, store)
    return cast(Store, PublishingStore(store, events_of(store)))
