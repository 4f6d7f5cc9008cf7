"""Actors SIGKILLed mid-round, and Redis going away, in the deployed shape."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from fedfleet.local import LocalDeployment
from tests.integration.deployed import Fault, reporting_after, run_deployed, small_job

pytestmark = pytest.mark.integration


def _kill(actor: str):  # type: ignore[no-untyped-def]
    return lambda d: d.kill(actor, signal.SIGKILL)


def _leader(d: LocalDeployment) -> str:
    lease = d.store.lease(d.job.name)
    assert lease is not None
    return lease.holder


def test_active_coordinator_sigkilled_standby_resumes_from_last_checkpoint() -> None:
    killed: list[str] = []

    def kill_leader(d: LocalDeployment) -> None:
        leader = _leader(d)
        killed.append(leader)
        d.kill(leader, signal.SIGKILL)

    out = run_deployed(small_job("chaos-coord"), faults=[Fault(reporting_after(4), kill_leader)])
    assert killed, "the fault never fired"
    assert out.finished
    assert out.result.model_version == 12
    assert out.versions_seen == sorted(out.versions_seen), "a model version went backwards"
    committed = [a["model_version"] for a in out.attempts if not a["abandoned"]]
    assert committed == sorted(set(committed))
    assert any(a["reason"] == "coordinator-failover" for a in out.attempts)


def test_selector_sigkilled_mid_round_round_still_completes() -> None:
    out = run_deployed(
        small_job("chaos-sel"), faults=[Fault(reporting_after(3), _kill("selector-0"))]
    )
    assert out.finished
    assert out.result.model_version == 12
    assert out.versions_seen == sorted(out.versions_seen)


def test_aggregator_sigkilled_mid_round_round_completes_or_is_rerun() -> None:
    out = run_deployed(
        small_job("chaos-agg"), faults=[Fault(reporting_after(3), _kill("aggregator-1"))]
    )
    assert out.finished
    assert out.result.model_version == 12
    assert out.versions_seen == sorted(out.versions_seen)
    committed = [a["model_version"] for a in out.attempts if not a["abandoned"]]
    assert committed == list(range(1, 13))


def test_redis_down_device_api_answers_503_and_everything_recovers() -> None:
    job = small_job("chaos-redis", rounds={"total": 200})
    with LocalDeployment(job, tick_seconds=0.1, lease_ttl=2.0) as d:
        assert d.redis is not None
        selector = d.actors["selector-0"].url
        body = {
            "device_id": "dev-1",
            "population": "it",
            "charging": True,
            "unmetered": True,
            "idle": True,
            "num_examples": 5,
        }
        auth = {
            "authorization": f"Bearer {d.keys.device_token('dev-1')}",
            "x-fedfleet-device": "dev-1",
        }
        assert httpx.post(f"{selector}/v1/checkin", json=body, headers=auth).status_code == 200
        d.redis.stop(kill=True)
        deadline = time.monotonic() + 10
        r = httpx.post(f"{selector}/v1/checkin", json=body, headers=auth)
        while r.status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
            r = httpx.post(f"{selector}/v1/checkin", json=body, headers=auth)
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) > 0
        assert httpx.get(f"{selector}/readyz").status_code == 503
        d.redis.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(httpx.get(a.url + "/readyz").status_code == 200 for a in d.actors.values()):
                break
            time.sleep(0.2)
        assert all(httpx.get(a.url + "/readyz").status_code == 200 for a in d.actors.values())
        assert httpx.post(f"{selector}/v1/checkin", json=body, headers=auth).status_code == 200
        assert all(a.alive for a in d.actors.values()), "an actor died while Redis was away"


def _kill_a_selector_holding_devices(after: int, killed: list[str]):  # type: ignore[no-untyped-def]
    """Once ``after`` versions are committed and a round is reporting, SIGKILL a selector that
    selected devices for it."""

    def when(d: LocalDeployment) -> bool:
        try:
            if d.store.model_version(d.job.name) < after:
                return False
            for r in d.store.rounds(d.job.name):
                if r.phase.value == "reporting":
                    counts = d.store.counts(d.job.name, r.key, "selected")
                    holders = [sel for sel, n in counts.items() if n > 0]
                    if holders:
                        killed.append(holders[0])
                        return True
            return False
        except Exception:
            return False

    return Fault(when, lambda d: d.kill(killed[-1], signal.SIGKILL))


def test_selector_sigkilled_during_a_secure_aggregation_round_the_job_completes() -> None:
    job = small_job(
        "chaos-secagg",
        rounds={"total": 6, "goalCount": 8},
        aggregation={
            "exampleWeightCap": 5,
            "secureAggregation": {"enabled": True, "minGroupSize": 5, "phaseTimeoutSeconds": 3},
        },
        actors={"selectors": 2, "devicesPerAggregator": 20},
    )
    killed: list[str] = []
    out = run_deployed(job, faults=[_kill_a_selector_holding_devices(2, killed)])
    assert killed, "the fault never fired"
    assert out.finished
    committed = [a["model_version"] for a in out.attempts if not a["abandoned"]]
    assert committed == list(range(1, 7))
    assert out.versions_seen == sorted(out.versions_seen)
    assert out.fleet_stats.connection_errors > 0  # the dead selector was noticed ...
    assert out.fleet_stats.secagg_completed >= 6 * 5  # ... and sessions still completed
