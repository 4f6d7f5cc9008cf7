"""Redis SIGKILLed and restarted mid-job: committed models survive, counters never go back.

Every Redis here is a real ``redis-server`` started by the launcher ``fedfleet up`` uses
(:mod:`fedfleet.redis_server`): durable by default (append-only file, fsync on every write),
or with ``durable=False`` a Redis that comes back empty.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedfleet.coordinator.actor import Coordinator, CoordinatorSettings
from fedfleet.core.roles import JobPhase, Role
from fedfleet.device.http_fleet import HttpFleet
from fedfleet.local import LocalDeployment, manifest_yaml
from fedfleet.results import JobResult
from fedfleet.store.base import StoreUnavailable
from fedfleet.store.redis import RedisStore
from fedfleet.up import StoreWatch, UpOptions, follow
from tests.integration.deployed import small_job
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

JOB = "durable"
ROUNDS = {"total": 8, "selectionTimeoutSeconds": 20, "reportingTimeoutSeconds": 40}
"""Generous timeouts: the devices train in this process, on a machine other tests load too."""


def test_a_durable_redis_keeps_every_acknowledged_commit_across_sigkill(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as srv:
        store = RedisStore.from_url(srv.url, prefix="d")
        token = store.acquire_lease(JOB, "c1", ttl=60.0)
        assert token is not None
        for v in range(5):
            store.commit_checkpoint(JOB, token, v, v + 1, bytes([v]) * 1000, {"accuracy": v / 10})
        before = (store.checkpoint(JOB), store.metrics(JOB))
        srv.stop(kill=True)
        with pytest.raises(StoreUnavailable):
            store.model_version(JOB)
        srv.start()
        assert (store.checkpoint(JOB), store.metrics(JOB)) == before
        assert store.model_version(JOB) == 5
        later = store.acquire_lease(JOB, "c2", ttl=60.0)
        assert later is None  # the lease itself survived (it had 60 s to live)
        store.close()


def test_fencing_tokens_and_attempt_numbers_never_go_back_when_redis_comes_back_empty(
    tmp_path: Path,
) -> None:
    job = small_job(JOB)
    settings = CoordinatorSettings(lease_ttl=30.0)
    with RedisServer(tmp_path / "redis", durable=False) as srv:
        store = RedisStore.from_url(srv.url, prefix="e")
        store.register(job.key, Role.aggregator, "aggregator-0", "http://a0", ttl=60.0)
        old = Coordinator(job, store, actor_id="coordinator-0", settings=settings)
        old.tick(time.time())
        old_token = old.token
        old_attempts = {r.attempt for r in store.rounds(job.key)}
        assert old_token is not None and old_attempts
        srv.stop(kill=True)
        srv.start()  # empty: nothing was persisted
        assert store.rounds(job.key) == [] and store.job_state(job.key) == {}
        store.register(job.key, Role.aggregator, "aggregator-0", "http://a0", ttl=60.0)
        new = Coordinator(job, store, actor_id="coordinator-1", settings=settings)
        new.tick(time.time())
        assert new.token is not None and new.token > old_token, "a fencing token went back"
        new_attempts = {r.attempt for r in store.rounds(job.key)}
        assert new_attempts and min(new_attempts) > max(old_attempts), (
            "an attempt number (and so its tickets) was reused"
        )
        # The deposed coordinator wakes up: its lease is gone and its token is stale.
        old.tick(time.time())
        assert old.token is None
        assert {r.attempt for r in store.rounds(job.key)} == new_attempts
        store.close()


def _committed(attempts: list[dict[str, Any]]) -> list[int]:
    return [int(a["model_version"]) for a in attempts if not a["abandoned"]]


@pytest.mark.timeout(900)  # six actor processes and a job, on a shared two-core machine
def test_redis_sigkilled_mid_job_committed_versions_survive_and_the_job_finishes() -> None:
    job = small_job("chaos-redis-kill", rounds=ROUNDS)
    total = job.spec.rounds.total
    result = JobResult(job=job.name)
    seen: dict[str, Any] = {}
    with LocalDeployment(job, tick_seconds=0.1, lease_ttl=2.0) as d:
        assert d.redis is not None and d.redis.proc is not None
        watch = StoreWatch(d, out=sys.stderr)

        async def kill_mid_job(stop: asyncio.Event) -> None:
            while not stop.is_set():
                try:
                    version = d.store.model_version(job.key)
                    reporting = any(r.phase.value == "reporting" for r in d.store.rounds(job.key))
                except StoreUnavailable:
                    version, reporting = 0, False
                if version >= 3 and reporting:
                    seen["version"] = version
                    seen["metrics"] = d.store.metrics(job.key)
                    seen["attempts"] = d.store.attempts(job.key)
                    assert d.redis is not None and d.redis.proc is not None
                    os.kill(d.redis.proc.pid, signal.SIGKILL)  # a crash, not a shutdown
                    return
                await asyncio.sleep(0.1)

        async def main() -> bool:
            fleet = HttpFleet(
                job,
                d.urls("selector"),
                d.keys,
                time_scale=0.01,  # the simulator's 20 s of training in 0.2 s, as elsewhere
                rest_seconds=UpOptions().rest_seconds,
                rest_rounds=UpOptions().rest_rounds,
            )
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(fleet.run(until=stop)),
                asyncio.create_task(kill_mid_job(stop)),
            ]
            try:
                return await follow(d, result, None, timeout=600, watch=watch)
            finally:
                stop.set()
                await asyncio.gather(*tasks)

        finished = asyncio.run(main())
        metrics = d.store.metrics(job.key)
        attempts = d.store.attempts(job.key)
        state = d.store.job_state(job.key)
        alive = all(a.alive for a in d.actors.values())
    assert "version" in seen, "the fault never fired"
    assert watch.restarts == 1 and watch.outages >= 1
    assert finished and state["phase"] == JobPhase.succeeded.value
    assert alive, "an actor died while Redis was away"
    before = seen["version"]
    # every version committed before the crash is still there, exactly as it was
    assert metrics[:before] == seen["metrics"][:before]
    assert attempts[: len(seen["attempts"])] == seen["attempts"]
    # and the job went on from the last committed version, not from version 0
    assert _committed(attempts) == list(range(1, total + 1))
    assert [m["model_version"] for m in metrics] == list(range(1, total + 1))


def _wait_for(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except StoreUnavailable:
            pass
        time.sleep(0.1)
    raise AssertionError("condition not reached")


@pytest.mark.timeout(900)
def test_fedfleet_up_rides_out_a_redis_outage(tmp_path: Path) -> None:
    """The command itself (a subprocess) keeps going while its store is down for a while."""
    job = small_job("chaos-up-outage", rounds=ROUNDS)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(manifest_yaml(job))
    report = tmp_path / "report.json"
    with RedisServer(tmp_path / "redis") as srv:
        store = RedisStore.from_url(srv.url, prefix="fedfleet")
        cmd = [sys.executable, "-m", "fedfleet.cli", "up", str(manifest), "--quiet"]
        cmd += ["--store", srv.url, "--report", str(report), "--out", str(tmp_path / "out")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _wait_for(lambda: store.model_version(job.key) >= 3, timeout=600)
            srv.stop(kill=True)
            time.sleep(2.0)  # an outage of two seconds, twice the one that killed the command
            srv.start()
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            store.close()
    stderr = err.decode(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "store unavailable" in stderr and "store reachable again" in stderr
    totals = json.loads(report.read_text())["totals"]
    assert totals["succeeded"] and totals["model_version"] == job.spec.rounds.total
    assert b"succeeded" in out
