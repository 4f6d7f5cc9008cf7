"""The one contract every store backend is held to (Flower's StateTest pattern).

Subclass :class:`StoreContract` and provide ``store`` (a fresh, empty store) and ``advance``
(move the store's clock forward); every test then runs against that backend.
"""

from __future__ import annotations

import time

import pytest

from fedfleet.core.protocol import Phase, Quota, RoundState
from fedfleet.store.base import REVOCATION_KEEP_S, Claim, ConflictError, FencedError, Store

JOB = "job-a"


def _round(attempt: int = 1, token: int = 1, phase: Phase = Phase.selecting) -> RoundState:
    return RoundState(
        round=1,
        attempt=attempt,
        phase=phase,
        target=13,
        goal=10,
        minimum=8,
        selection_deadline=60.0,
        aggregators=("agg-0", "agg-1"),
        master="agg-1",
        token=token,
    )


class StoreContract:
    store: Store

    def advance(self, seconds: float) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def now(self) -> float:
        """The store's clock (Unix seconds): the wall clock unless a backend drives its own."""
        return time.time()

    # -- lease ----------------------------------------------------------------------------------
    def test_lease_is_exclusive_until_it_expires(self) -> None:
        t1 = self.store.acquire_lease(JOB, "c1", ttl=1.0)
        assert t1 is not None
        assert self.store.acquire_lease(JOB, "c2", ttl=1.0) is None
        lease = self.store.lease(JOB)
        assert lease is not None and lease.holder == "c1" and lease.token == t1
        self.advance(1.2)
        t2 = self.store.acquire_lease(JOB, "c2", ttl=1.0)
        assert t2 is not None and t2 > t1

    def test_renewal_keeps_the_lease_and_a_deposed_holder_cannot_renew(self) -> None:
        t1 = self.store.acquire_lease(JOB, "c1", ttl=1.0)
        assert t1 is not None
        self.advance(0.6)
        assert self.store.renew_lease(JOB, "c1", t1, ttl=1.0)
        self.advance(0.6)
        assert self.store.acquire_lease(JOB, "c2", ttl=1.0) is None  # renewed, still held
        self.advance(1.2)
        t2 = self.store.acquire_lease(JOB, "c2", ttl=1.0)
        assert t2 is not None
        assert not self.store.renew_lease(JOB, "c1", t1, ttl=1.0)

    def test_release_frees_the_lease(self) -> None:
        t1 = self.store.acquire_lease(JOB, "c1", ttl=30.0)
        assert t1 is not None
        self.store.release_lease(JOB, "c1", t1)
        assert self.store.lease(JOB) is None
        assert self.store.acquire_lease(JOB, "c2", ttl=30.0) is not None

    def test_stale_token_writes_are_fenced(self) -> None:
        t1 = self.store.acquire_lease(JOB, "c1", ttl=1.0)
        assert t1 is not None
        self.store.put_round(JOB, t1, _round(token=t1))
        self.advance(1.5)
        t2 = self.store.acquire_lease(JOB, "c2", ttl=1.0)
        assert t2 is not None
        with pytest.raises(FencedError):
            self.store.put_round(JOB, t1, _round(attempt=2, token=t1))
        with pytest.raises(FencedError):
            self.store.commit_checkpoint(JOB, t1, 0, 1, b"model", {"accuracy": 0.5})
        with pytest.raises(FencedError):
            self.store.put_quotas(JOB, t1, {})
        with pytest.raises(FencedError):
            self.store.put_job_state(JOB, t1, {"phase": "Running"})
        assert self.store.model_version(JOB) == 0
        assert [r.attempt for r in self.store.rounds(JOB)] == [1]

    # -- registration ---------------------------------------------------------------------------
    def test_registrations_expire_without_heartbeats(self) -> None:
        self.store.register(JOB, "selector", "s0", "http://127.0.0.2:8000", ttl=1.0)
        self.store.register(JOB, "selector", "s1", "http://127.0.0.3:8000", ttl=1.0)
        assert self.store.members(JOB, "selector") == {
            "s0": "http://127.0.0.2:8000",
            "s1": "http://127.0.0.3:8000",
        }
        self.advance(0.6)
        self.store.register(JOB, "selector", "s0", "http://127.0.0.2:8000", ttl=1.0)
        self.advance(0.6)
        assert list(self.store.members(JOB, "selector")) == ["s0"]
        self.store.deregister(JOB, "selector", "s0")
        assert self.store.members(JOB, "selector") == {}
        assert self.store.members(JOB, "aggregator") == {}

    # -- rounds, quotas, counters -----------------------------------------------------------------
    def test_round_state_round_trips_and_clears(self) -> None:
        token = self.store.acquire_lease(JOB, "c1", ttl=30.0)
        assert token is not None
        first = _round(attempt=1, token=token)
        second = _round(attempt=2, token=token).evolve(phase=Phase.reporting, model_version=3)
        self.store.put_round(JOB, token, second)
        self.store.put_round(JOB, token, first)
        assert self.store.rounds(JOB) == [first, second]
        self.store.add_count(JOB, first.key, "selected", "s0", 3)
        self.store.put_partial(JOB, first.key, "agg-0", b"partial")
        self.store.clear_round(JOB, first.key)
        assert self.store.rounds(JOB) == [second]
        assert self.store.counts(JOB, first.key, "selected") == {}
        assert self.store.partials(JOB, first.key) == {}

    def test_quotas_are_per_selector(self) -> None:
        token = self.store.acquire_lease(JOB, "c1", ttl=30.0)
        assert token is not None
        q = Quota(
            round=1,
            attempt=1,
            count=7,
            checkin_rate=0.5,
            next_open=10.0,
            aggregators=("agg-0",),
            round_share=7,
        )
        self.store.put_quotas(
            JOB,
            token,
            {"s0": q, "s1": q.__class__(**{**q.to_dict(), "count": 6, "aggregators": ()})},
        )
        assert self.store.quota(JOB, "s0") == q
        s1 = self.store.quota(JOB, "s1")
        assert s1 is not None and s1.count == 6
        assert self.store.quota(JOB, "s9") is None

    def test_counters_add_up_per_actor(self) -> None:
        self.store.add_count(JOB, "a1", "reported", "agg-0", 2)
        self.store.add_count(JOB, "a1", "reported", "agg-0", 3)
        self.store.add_count(JOB, "a1", "reported", "agg-1", 1)
        self.store.add_count(JOB, "a1", "dropped", "s0", 1)
        assert self.store.counts(JOB, "a1", "reported") == {"agg-0": 5, "agg-1": 1}
        assert self.store.counts(JOB, "a1", "dropped") == {"s0": 1}
        assert self.store.counts(JOB, "a2", "reported") == {}

    def test_a_report_is_claimed_once_per_device_across_aggregators(self) -> None:
        assert self.store.claim_report(JOB, "a1", "agg-0", 3, "d1") is Claim.taken
        # The round's other aggregator (and the same one) refuse the device's second report,
        # and the refusal takes no slot.
        assert self.store.claim_report(JOB, "a1", "agg-1", 3, "d1") is Claim.reported
        assert self.store.claim_report(JOB, "a1", "agg-0", 3, "d1") is Claim.reported
        assert self.store.counts(JOB, "a1", "reported") == {"agg-0": 1}
        assert self.store.claim_report(JOB, "a1", "agg-1", 3, "d2") is Claim.taken
        assert self.store.claim_report(JOB, "a1", "agg-1", 3, "d3") is Claim.taken
        assert self.store.claim_report(JOB, "a1", "agg-0", 3, "d4") is Claim.full
        # A device refused because the round was full has no claim: it stays a straggler.
        assert self.store.claim_report(JOB, "a1", "agg-0", 3, "d4") is Claim.full
        # Claims are per attempt.
        assert self.store.claim_report(JOB, "a2", "agg-0", 3, "d1") is Claim.taken

    def test_an_abort_bars_a_later_report_and_a_report_bars_an_abort(self) -> None:
        assert self.store.claim_abort(JOB, "a1", "d1")
        assert not self.store.claim_abort(JOB, "a1", "d1")  # counted once
        assert self.store.claim_report(JOB, "a1", "agg-0", 5, "d1") is Claim.aborted
        assert self.store.counts(JOB, "a1", "reported") == {}
        assert self.store.claim_report(JOB, "a1", "agg-0", 5, "d2") is Claim.taken
        assert not self.store.claim_abort(JOB, "a1", "d2")
        assert self.store.claim_abort(JOB, "a2", "d2")

    def test_clearing_a_round_clears_its_claims(self) -> None:
        assert self.store.claim_report(JOB, "a1", "agg-0", 5, "d1") is Claim.taken
        assert self.store.claim_abort(JOB, "a1", "d2")
        self.store.clear_round(JOB, "a1")
        assert self.store.claim_report(JOB, "a1", "agg-0", 5, "d2") is Claim.taken
        assert self.store.claim_report(JOB, "a1", "agg-0", 5, "d1") is Claim.taken

    def test_partials_are_kept_per_aggregator(self) -> None:
        self.store.put_partial(JOB, "a1", "agg-0", b"\x00\x01")
        self.store.put_partial(JOB, "a1", "agg-1", b"\x02" * 1000)
        assert self.store.partials(JOB, "a1") == {"agg-0": b"\x00\x01", "agg-1": b"\x02" * 1000}

    # -- checkpoints ------------------------------------------------------------------------------
    def test_commit_bumps_version_and_appends_metrics_atomically(self) -> None:
        token = self.store.acquire_lease(JOB, "c1", ttl=30.0)
        assert token is not None
        assert self.store.checkpoint(JOB) is None
        assert self.store.model_version(JOB) == 0
        v1 = self.store.commit_checkpoint(JOB, token, 0, 1, b"m1", {"accuracy": 0.5})
        v2 = self.store.commit_checkpoint(JOB, token, 1, 2, b"m2", {"accuracy": 0.7})
        assert (v1, v2) == (1, 2)
        cp = self.store.checkpoint(JOB)
        assert cp is not None and (cp.version, cp.round, cp.data) == (2, 2, b"m2")
        hist = self.store.metrics(JOB)
        assert [(m["round"], m["model_version"], m["accuracy"]) for m in hist] == [
            (1, 1, 0.5),
            (2, 2, 0.7),
        ]

    def test_commit_on_a_moved_version_is_a_conflict_and_changes_nothing(self) -> None:
        token = self.store.acquire_lease(JOB, "c1", ttl=30.0)
        assert token is not None
        self.store.commit_checkpoint(JOB, token, 0, 1, b"m1", {"accuracy": 0.5})
        with pytest.raises(ConflictError):
            self.store.commit_checkpoint(JOB, token, 0, 1, b"other", {"accuracy": 0.9})
        cp = self.store.checkpoint(JOB)
        assert cp is not None and (cp.version, cp.data) == (1, b"m1")
        assert len(self.store.metrics(JOB)) == 1

    def test_job_state_and_delete(self) -> None:
        token = self.store.acquire_lease(JOB, "c1", ttl=30.0)
        assert token is not None
        self.store.put_job_state(JOB, token, {"phase": "Running", "round": 3})
        assert self.store.job_state(JOB) == {"phase": "Running", "round": 3}
        self.store.commit_checkpoint(JOB, token, 0, 1, b"m1", {"accuracy": 0.5})
        self.store.put_job_state(
            "job-b", self.store.acquire_lease("job-b", "c", 30.0) or 0, {"x": 1}
        )
        assert self.store.delete_job(JOB) >= 1
        assert self.store.job_state(JOB) == {}
        assert self.store.checkpoint(JOB) is None
        assert self.store.job_state("job-b") == {"x": 1}

    def test_jobs_lists_the_jobs_with_a_job_record(self) -> None:
        assert self.store.jobs() == []
        for name in ("ns/b", "ns/a:x"):
            token = self.store.acquire_lease(name, "c1", ttl=30.0)
            assert token is not None
            self.store.put_job_state(name, token, {"phase": "Running"})
        self.store.acquire_lease("only-a-lease", "c1", ttl=30.0)  # no job record: not listed
        self.store.job_state("never-written")  # a read creates nothing
        assert self.store.jobs() == ["ns/a:x", "ns/b"]
        self.store.delete_job("ns/b")
        assert self.store.jobs() == ["ns/a:x"]

    # -- attempt history (appended by the coordinator, read by `fedfleet up` and the operator)
    def test_attempt_history_is_fenced_and_ordered(self) -> None:
        t1 = self.store.acquire_lease(JOB, "c1", ttl=1.0)
        assert t1 is not None
        self.store.record_attempt(JOB, t1, {"attempt": 1, "abandoned": True, "reason": "x"})
        self.store.record_attempt(JOB, t1, {"attempt": 2, "abandoned": False, "metrics": {}})
        assert [a["attempt"] for a in self.store.attempts(JOB)] == [1, 2]
        assert [a["attempt"] for a in self.store.attempts(JOB, 1)] == [2]
        assert self.store.attempts(JOB)[0]["reason"] == "x"
        self.advance(1.5)
        t2 = self.store.acquire_lease(JOB, "c2", ttl=1.0)
        assert t2 is not None
        with pytest.raises(FencedError):
            self.store.record_attempt(JOB, t1, {"attempt": 3})
        assert len(self.store.attempts(JOB)) == 2
        assert [a["attempt"] for a in self.store.attempts(JOB, -1)] == [2]  # the newest

    # -- the aggregator pool (published by aggregators, drained by the operator) --------------
    def test_actor_loads_replace_per_actor_and_go_with_the_job(self) -> None:
        assert self.store.actor_loads(JOB) == {}
        self.store.put_actor_load(JOB, "agg-1", {"bytes_per_second": 1.5, "update_bytes": 40})
        self.store.put_actor_load(JOB, "agg-0", {"bytes_per_second": 2.0, "update_bytes": 40})
        self.store.put_actor_load(JOB, "agg-1", {"bytes_per_second": 3.0, "update_bytes": 40})
        loads = self.store.actor_loads(JOB)
        assert list(loads) == ["agg-0", "agg-1"]
        assert loads["agg-1"] == {"bytes_per_second": 3.0, "update_bytes": 40}
        assert self.store.actor_loads("job-b") == {}
        self.store.delete_job(JOB)
        assert self.store.actor_loads(JOB) == {}

    def test_draining_set_is_replaced_whole(self) -> None:
        assert self.store.draining(JOB) == set()
        self.store.set_draining(JOB, ["agg-2", "agg-3"])
        assert self.store.draining(JOB) == {"agg-2", "agg-3"}
        self.store.set_draining(JOB, ["agg-3"])
        assert self.store.draining(JOB) == {"agg-3"}
        assert self.store.draining("job-b") == set()
        self.store.set_draining(JOB, [])
        assert self.store.draining(JOB) == set()

    # -- population revocations (device enrollment) ----------------------------------------------
    def test_revocations_are_per_population_and_the_latest_wins(self) -> None:
        now = self.now()
        assert self.store.revoked_devices("phones") == {}
        self.store.revoke_device("phones", "d-1", now - 5)
        self.store.revoke_device("phones", "d-2", now)
        self.store.revoke_device("tablets", "d-1", now - 1)
        assert self.store.revoked_devices("phones") == {"d-1": now - 5, "d-2": now}
        assert self.store.revoked_devices("tablets") == {"d-1": now - 1}
        self.store.revoke_device("phones", "d-1", now + 2)
        self.store.revoke_device("phones", "d-1", now - 100)  # an older one changes nothing
        assert self.store.revoked_devices("phones")["d-1"] == now + 2

    # -- population routes (the gateway's view of its jobs' selectors) ----------------------------
    def test_routes_are_per_population_expire_and_can_be_withdrawn(self) -> None:
        assert self.store.population_routes("phones") == {}
        self.store.announce_route("phones", "r1", '{"job": "a"}', ttl=1.0)
        self.store.announce_route("phones", "r2", '{"job": "b"}', ttl=30.0)
        self.store.announce_route("tablets", "r1", '{"job": "c"}', ttl=30.0)
        assert self.store.population_routes("phones") == {
            "r1": '{"job": "a"}',
            "r2": '{"job": "b"}',
        }
        self.store.announce_route("phones", "r2", '{"job": "b2"}', ttl=30.0)  # a refresh
        assert self.store.population_routes("phones")["r2"] == '{"job": "b2"}'
        self.advance(1.5)
        assert self.store.population_routes("phones") == {"r2": '{"job": "b2"}'}
        self.store.withdraw_route("phones", "r2")
        assert self.store.population_routes("phones") == {}
        assert self.store.population_routes("tablets") == {"r1": '{"job": "c"}'}

    def test_revocations_outlive_jobs_and_are_not_jobs(self) -> None:
        now = self.now()
        self.store.revoke_device(JOB, "d-1", now)
        token = self.store.acquire_lease(JOB, "c1", ttl=30.0)
        assert token is not None
        self.store.put_job_state(JOB, token, {"phase": "Running"})
        self.store.delete_job(JOB)  # a job named like the population
        assert self.store.revoked_devices(JOB) == {"d-1": now}
        assert self.store.jobs() == []

    def test_revocations_are_forgotten_once_every_credential_they_refuse_expired(self) -> None:
        now = self.now()
        self.store.revoke_device("phones", "d-old", now - REVOCATION_KEEP_S - 60)
        self.store.revoke_device("phones", "d-kept", now - REVOCATION_KEEP_S + 3600)
        assert self.store.revoked_devices("phones") == {"d-kept": now - REVOCATION_KEEP_S + 3600}
