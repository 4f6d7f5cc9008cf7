"""The store contract against a real redis-server, plus what only Redis can get wrong.

The contract runs in real time (``advance`` sleeps; the lease tests use ~1 s TTLs). The Redis
tests cover authentication, an outage and recovery on the same client, the key layout, and
atomicity under real concurrency (two clients racing for a lease, aggregators racing for the
last report slots).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from fedfleet.core.protocol import Phase, Quota, RoundState
from fedfleet.store.base import REVOCATION_KEEP_S, Claim, StoreUnavailable
from fedfleet.store.factory import open_store
from fedfleet.store.redis import PASSWORD_ENV, RedisStore
from tests.contract.store_contract import JOB, StoreContract
from tests.redis_server import RedisServer

pytestmark = pytest.mark.contract

T = TypeVar("T")


class TestRedisStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _store(self, redis_url: str, redis_prefix: str) -> Iterator[None]:
        self.store = RedisStore.from_url(redis_url, prefix=redis_prefix)
        yield
        self.store.close()

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)


def _in_threads(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(i)`` on ``n`` threads released together; results in thread order."""
    barrier = threading.Barrier(n)
    results: list[T | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def test_open_store_builds_a_redis_store(redis_url: str) -> None:
    store = open_store(redis_url)
    try:
        assert isinstance(store, RedisStore)
    finally:
        store.close()


def test_a_password_is_required(redis_server: RedisServer, redis_prefix: str) -> None:
    assert redis_server.password
    bare = f"redis://{redis_server.host}:{redis_server.port}/0"
    wrong = f"redis://:not-the-password@{redis_server.host}:{redis_server.port}/0"
    for url in (bare, wrong):
        store = RedisStore.from_url(url, prefix=redis_prefix)
        with pytest.raises(StoreUnavailable) as info:
            store.model_version(JOB)
        message = str(info.value)
        assert f"{redis_server.host}:{redis_server.port}" in message
        assert "not-the-password" not in message
        store.close()


def test_the_password_may_come_from_the_environment(
    redis_server: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert redis_server.password
    monkeypatch.setenv(PASSWORD_ENV, redis_server.password)
    store = RedisStore.from_url(
        f"redis://{redis_server.host}:{redis_server.port}/0", prefix=redis_prefix
    )
    try:
        assert store.acquire_lease(JOB, "c1", ttl=30.0) is not None
    finally:
        store.close()


def test_unix_socket_urls_work(redis_server: RedisServer, redis_prefix: str) -> None:
    store = RedisStore.from_url(redis_server.unix_url, prefix=redis_prefix)
    try:
        store.register(JOB, "selector", "s0", "http://127.0.0.2:8000", ttl=30.0)
        assert store.members(JOB, "selector") == {"s0": "http://127.0.0.2:8000"}
    finally:
        store.close()


def test_an_outage_is_store_unavailable_and_the_same_client_recovers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # its own server: stopping the shared one would fail tests running beside this one
    with RedisServer(
        password="s3cret-pw", workdir=tmp_path_factory.mktemp("redis-outage"), durable=False
    ) as srv:
        store = RedisStore.from_url(srv.url, prefix="outage", socket_timeout=1.0)
        first = store.acquire_lease(JOB, "c1", ttl=30.0)
        assert first is not None
        srv.stop()
        started = time.monotonic()
        calls: list[Callable[[], object]] = [
            lambda: store.model_version(JOB),
            lambda: store.acquire_lease(JOB, "c2", ttl=30.0),
            lambda: store.commit_checkpoint(JOB, 1, 0, 1, b"m", {}),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert f"127.0.0.1:{srv.port}" in str(info.value)
            assert "s3cret-pw" not in str(info.value)
        assert time.monotonic() - started < 3.0, "a dead Redis must fail fast"
        srv.start()  # same port, empty (nothing persisted); the scripts are loaded again
        token = store.acquire_lease(JOB, "c2", ttl=30.0)
        assert token is not None and token > first, "a fencing token went backwards"
        assert store.commit_checkpoint(JOB, token, 0, 1, b"m", {"accuracy": 1.0}) == 1
        # a restart between two calls: the pooled connection is dead, the next call reconnects
        srv.stop()
        srv.start()
        assert store.model_version(JOB) == 0
        third = store.acquire_lease(JOB, "c3", ttl=30.0)
        assert third is not None and third > token
        store.close()


def test_every_key_is_under_the_job_prefix_and_delete_job_removes_them(
    redis_server: RedisServer, redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    other = "job-b"
    for job in (JOB, other):
        token = store.acquire_lease(job, "c1", ttl=30.0)
        assert token is not None
        state = RoundState(
            round=1, attempt=1, phase=Phase.selecting, target=3, goal=2, minimum=1,
            selection_deadline=1.0, token=token,
        )  # fmt: skip
        store.put_round(job, token, state)
        store.put_quotas(job, token, {"s0": Quota(1, 1, 3, 0.5, 10.0)})
        store.add_count(job, state.key, "selected", "s0", 3)
        assert store.claim_report(job, state.key, "agg-0", 2, "d1") is Claim.taken
        store.put_partial(job, state.key, "agg-0", b"\x00" * 16)
        store.register(job, "aggregator", "agg-0", "http://127.0.0.4:8000", ttl=30.0)
        store.commit_checkpoint(job, token, 0, 1, b"model", {"accuracy": 0.5})
        store.put_job_state(job, token, {"phase": "Running"})
        store.record_attempt(job, token, {"attempt": 1, "abandoned": False})

    raw = redis_server.client()
    try:
        keys = sorted(k.decode() for k in raw.scan_iter(match=f"{redis_prefix}:*"))
        mine = [k for k in keys if k.startswith(f"{redis_prefix}:{{{JOB}}}:")]
        theirs = [k for k in keys if k.startswith(f"{redis_prefix}:{{{other}}}:")]
        assert len(mine) + len(theirs) == len(keys)
        assert {k.split(":", 2)[2] for k in mine} == {
            "lease", "token", "rounds", "quotas", "count:a1:selected", "count:a1:reported",
            "kinds:a1", "partials:a1", "claims:a1", "members:aggregator", "addr:aggregator",
            "checkpoint", "metrics", "attempts", "state",
        }  # fmt: skip

        assert store.delete_job(JOB) == len(mine)
        assert not list(raw.scan_iter(match=f"{redis_prefix}:{{{JOB}}}:*"))
        assert len(list(raw.scan_iter(match=f"{redis_prefix}:*"))) == len(theirs)
        assert store.delete_job(JOB) == 0
        assert store.model_version(other) == 1

        store.clear_round(other, "a1")
        left = {k.decode().split(":", 2)[2] for k in raw.scan_iter(match=f"{redis_prefix}:*")}
        assert not {k for k in left if k.endswith(":a1") or ":a1:" in k}
    finally:
        raw.close()
        store.close()


def test_two_clients_racing_for_a_lease_exactly_one_wins(redis_url: str, redis_prefix: str) -> None:
    stores = [RedisStore.from_url(redis_url, prefix=redis_prefix) for _ in range(2)]
    try:
        last = 0
        for attempt in range(20):
            tokens = _in_threads(2, lambda i: stores[i].acquire_lease(JOB, f"c{i}", ttl=30.0) or 0)
            winners = [(i, t) for i, t in enumerate(tokens) if t]
            assert len(winners) == 1, f"attempt {attempt}: {tokens}"
            i, token = winners[0]
            assert token > last
            last = token
            lease = stores[1 - i].lease(JOB)
            assert lease is not None and (lease.holder, lease.token) == (f"c{i}", token)
            stores[i].release_lease(JOB, f"c{i}", token)
    finally:
        for s in stores:
            s.close()


def test_concurrent_claims_stop_at_exactly_the_goal(redis_url: str, redis_prefix: str) -> None:
    stores = [RedisStore.from_url(redis_url, prefix=redis_prefix) for _ in range(4)]
    try:
        claimed = _in_threads(
            4,
            lambda i: sum(
                stores[i].claim_report(JOB, "a1", f"agg-{i}", 25, f"d{i}-{n}") is Claim.taken
                for n in range(20)
            ),
        )
        assert sum(claimed) == 25
        assert sum(stores[0].counts(JOB, "a1", "reported").values()) == 25
    finally:
        for s in stores:
            s.close()


def test_one_device_racing_to_every_aggregator_is_counted_once(
    redis_url: str, redis_prefix: str
) -> None:
    stores = [RedisStore.from_url(redis_url, prefix=redis_prefix) for _ in range(4)]
    try:
        for n in range(10):
            answers = _in_threads(
                4,
                lambda i, device=f"d{n}": (
                    stores[i].claim_abort(JOB, "a1", device)
                    if i == 3
                    else stores[i].claim_report(JOB, "a1", f"agg-{i}", 100, device) is Claim.taken
                ),
            )
            assert sum(bool(a) for a in answers) == 1, answers
    finally:
        for s in stores:
            s.close()


def test_job_names_with_braces_are_refused(redis_url: str, redis_prefix: str) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    try:
        with pytest.raises(ValueError, match="braces"):
            store.model_version("a}b")
    finally:
        store.close()


def test_jobs_are_listed_per_prefix(redis_url: str, redis_prefix: str) -> None:
    """Another prefix's jobs (or a prefix that merely starts like this one) are not listed."""
    stores = [
        RedisStore.from_url(redis_url, prefix=p)
        for p in (redis_prefix, f"{redis_prefix}:sub", f"{redis_prefix}x")
    ]
    try:
        for i, store in enumerate(stores):
            token = store.acquire_lease(f"ns/job-{i}", "c1", ttl=30.0)
            assert token is not None
            store.put_job_state(f"ns/job-{i}", token, {"phase": "Running"})
        assert [s.jobs() for s in stores] == [["ns/job-0"], ["ns/job-1"], ["ns/job-2"]]
    finally:
        for store in stores:
            store.close()


def test_revocations_live_in_one_expiring_population_hash(
    redis_server: RedisServer, redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    raw = redis_server.client()
    try:
        store.revoke_device("phones", "d-1", time.time())
        store.revoke_device("phones", "d-2", time.time())
        keys = [k.decode() for k in raw.scan_iter(match=f"{redis_prefix}:*")]
        assert keys == [f"{redis_prefix}:population:{{phones}}:revoked"]
        ttl_ms = int(raw.pttl(keys[0]))
        assert 0 < ttl_ms <= REVOCATION_KEEP_S * 1000
        assert ttl_ms > (REVOCATION_KEEP_S - 60) * 1000  # refreshed by the last write
        with pytest.raises(ValueError, match="braces"):
            store.revoke_device("a{b}", "d-1", time.time())
    finally:
        raw.close()
        store.close()
