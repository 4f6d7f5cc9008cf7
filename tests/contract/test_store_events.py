"""Store events (``fedfleet.store.events``) behave the same on the memory and the Redis store.

A write through :func:`publishing` announces its topic to every subscriber of the job — on
another handle of the same Redis, as another process would hold — and only after it
succeeded; a refused write, another job's writes and a closed subscription announce nothing.
Waits are bounded (pub/sub is asynchronous), never timed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from fedfleet.core.protocol import Phase, Quota, RoundState
from fedfleet.service.ops import Ticker
from fedfleet.store.base import Claim, FencedError, Store
from fedfleet.store.events import (
    COMMITS,
    COUNTS,
    PARTIALS,
    QUOTAS,
    REPORTS,
    ROUNDS,
    TOPICS,
    events_of,
    publishing,
)
from fedfleet.store.memory import MemoryStore
from fedfleet.store.redis import RedisStore

pytestmark = pytest.mark.contract

JOB = "job-events"
WAIT = 10.0


@dataclass
class Heard:
    topics: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, topic: str) -> None:
        with self.cond:
            self.topics.append(topic)
            self.cond.notify_all()

    def wait_for(self, topic: str) -> list[str]:
        """Everything heard up to and including the first ``topic`` (bounded wait)."""
        with self.cond:
            assert self.cond.wait_for(lambda: topic in self.topics, WAIT), (
                f"{topic!r} not announced; heard {self.topics}"
            )
            return self.topics[: self.topics.index(topic) + 1]


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> Iterator[tuple[Store, Store]]:
    """A writer and a listener handle on one store (two clients of one Redis)."""
    if request.param == "memory":
        shared = MemoryStore()
        yield shared, shared
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    writer, listener = (RedisStore.from_url(url, prefix=prefix) for _ in range(2))
    yield writer, listener
    writer.close()
    listener.close()


def _round(token: int, phase: Phase = Phase.selecting) -> RoundState:
    return RoundState(
        round=1,
        attempt=1,
        phase=phase,
        target=2,
        goal=2,
        minimum=1,
        selection_deadline=1e12,
        aggregators=("agg-0",),
        master="agg-0",
        token=token,
    )


def test_each_write_announces_its_topic(stores: tuple[Store, Store]) -> None:
    writer, listener = stores
    heard = Heard()
    stop = events_of(listener).subscribe(JOB, TOPICS, heard)
    try:
        store = publishing(writer)
        token = store.acquire_lease(JOB, "c", ttl=30.0)
        assert token is not None
        store.put_round(JOB, token, _round(token))
        assert heard.wait_for(ROUNDS) == [ROUNDS]
        quota = Quota(round=1, attempt=1, count=2, checkin_rate=1.0, next_open=0.0)
        store.put_quotas(JOB, token, {"sel-0": quota})
        heard.wait_for(QUOTAS)
        store.add_count(JOB, "a1", "selected", "sel-0", 2)
        heard.wait_for(COUNTS)
        assert store.claim_report(JOB, "a1", "agg-0", 2, "dev-1") is Claim.taken
        heard.wait_for(REPORTS)
        store.put_partial(JOB, "a1", "agg-0", b"sum")
        heard.wait_for(PARTIALS)
        store.commit_checkpoint(JOB, token, 0, 1, b"model", {})
        heard.wait_for(COMMITS)
        assert set(heard.topics) == set(TOPICS)
    finally:
        stop()


def test_refused_writes_and_other_jobs_announce_nothing(stores: tuple[Store, Store]) -> None:
    writer, listener = stores
    heard = Heard()
    stop = events_of(listener).subscribe(JOB, (ROUNDS, REPORTS, QUOTAS), heard)
    try:
        store = publishing(writer)
        token = store.acquire_lease(JOB, "c", ttl=30.0)
        other = store.acquire_lease("job-other", "c", ttl=30.0)
        assert token is not None and other is not None
        with pytest.raises(FencedError):
            store.put_round(JOB, token + 1000, _round(token + 1000))
        store.put_round("job-other", other, _round(other))
        assert store.claim_report(JOB, "a1", "agg-0", 1, "dev-1") is Claim.taken
        assert store.claim_report(JOB, "a1", "agg-0", 1, "dev-2") is Claim.full
        assert not store.claim_abort(JOB, "a1", "dev-1")  # it reported: nothing recorded
        store.put_quotas(JOB, token, {})  # the marker: everything before it was sent first
        assert heard.wait_for(QUOTAS) == [REPORTS, QUOTAS]
    finally:
        stop()


def test_a_closed_subscription_hears_nothing_more(stores: tuple[Store, Store]) -> None:
    writer, listener = stores
    closed, still = Heard(), Heard()
    stop_closed = events_of(listener).subscribe(JOB, (COUNTS,), closed)
    stop_still = events_of(listener).subscribe(JOB, (COUNTS,), still)
    try:
        store = publishing(writer)
        store.add_count(JOB, "a1", "selected", "sel-0", 1)
        closed.wait_for(COUNTS)
        still.wait_for(COUNTS)
        stop_closed()
        store.add_count(JOB, "a1", "selected", "sel-0", 1)
        with still.cond:
            assert still.cond.wait_for(lambda: len(still.topics) == 2, WAIT)
        assert closed.topics == [COUNTS]
    finally:
        stop_still()


def test_an_announcement_wakes_a_ticker_long_before_its_interval(
    stores: tuple[Store, Store],
) -> None:
    writer, listener = stores
    ticked = threading.Event()
    ticks: list[float] = []

    def tick(now: float) -> None:
        ticks.append(now)
        if len(ticks) > 1:
            ticked.set()

    ticker = Ticker("events-test", tick, interval=3600.0)  # the timer alone never ticks again
    ticker.wake_on(events_of(listener), JOB, (ROUNDS,))
    ticker.start()
    try:
        store = publishing(writer)
        token = store.acquire_lease(JOB, "c", ttl=30.0)
        assert token is not None
        store.put_round(JOB, token, _round(token))
        assert ticked.wait(WAIT), "the ticker did not tick on the announcement"
    finally:
        ticker.stop()
    assert len(ticks) >= 2
