"""In-memory store for embedded runs and tests: the reference for the contract suite.

A lock makes every method atomic, which is the property the Redis store gets from Lua
scripts and MULTI/EXEC. Time comes from an injected clock so the embedded runner can drive it
with simulated time.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedfleet.core.protocol import Quota, RoundState
from fedfleet.store.base import (
    REVOCATION_KEEP_S,
    Checkpoint,
    Claim,
    ConflictError,
    FencedError,
    Lease,
)
from fedfleet.store.events import LocalEvents

__all__ = ["MemoryStore"]


@dataclass
class _Job:
    lease: Lease | None = None
    last_token: int = 0
    members: dict[str, dict[str, tuple[str, float]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    rounds: dict[str, RoundState] = field(default_factory=dict)
    quotas: dict[str, Quota] = field(default_factory=dict)
    counts: dict[tuple[str, str], dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    partials: dict[str, dict[str, bytes]] = field(default_factory=lambda: defaultdict(dict))
    claims: dict[str, dict[str, Claim]] = field(default_factory=lambda: defaultdict(dict))
    """Per attempt: device -> reported or aborted."""
    checkpoint: Checkpoint | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)


class MemoryStore:
    @property
    def unwrapped(self) -> MemoryStore:
        """This store, also when reached through a wrapper that delegates attributes (the
        telemetry and events wrappers do): side tables of the process that belong to the store,
        like its kept models, are keyed by it, so every actor sharing it finds them."""
        return self

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.time  # wall clock, like Redis: deadlines cross processes
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = defaultdict(_Job)
        self._revoked: dict[str, dict[str, float]] = defaultdict(dict)
        """Per population: device id -> revoked at (not a job's: delete_job keeps it)."""
        self._routes: dict[str, dict[str, tuple[str, float]]] = defaultdict(dict)
        """Per population: route id -> (entry, expires at)."""
        self._events = LocalEvents()

    def events(self) -> LocalEvents:
        """This store's event hub (:mod:`fedfleet.store.events`): every actor sharing the
        store in this process hears the others' announcements."""
        return self._events

    # -- lease ------------------------------------------------------------------------------
    def acquire_lease(self, job: str, holder: str, ttl: float) -> int | None:
        with self._lock:
            j, now = self._jobs[job], self._clock()
            if j.lease is not None and j.lease.expires_at > now:
                return None
            j.last_token += 1
            j.lease = Lease(holder, j.last_token, now + ttl)
            return j.last_token

    def renew_lease(self, job: str, holder: str, token: int, ttl: float) -> bool:
        with self._lock:
            j, now = self._jobs[job], self._clock()
            if j.lease is None or j.lease.holder != holder or j.lease.token != token:
                return False
            if j.lease.expires_at <= now:
                return False
            j.lease = Lease(holder, token, now + ttl)
            return True

    def release_lease(self, job: str, holder: str, token: int) -> None:
        with self._lock:
            j = self._jobs[job]
            if j.lease is not None and j.lease.holder == holder and j.lease.token == token:
                j.lease = None

    def lease(self, job: str) -> Lease | None:
        with self._lock:
            lease = self._jobs[job].lease
            return lease if lease is not None and lease.expires_at > self._clock() else None

    def _check_token(self, j: _Job, token: int) -> None:
        if token != j.last_token:
            raise FencedError(f"fencing token {token} is stale (current {j.last_token})")

    # -- registration ---------------------------------------------------------------------------
    def register(self, job: str, role: str, actor_id: str, address: str, ttl: float) -> None:
        with self._lock:
            self._jobs[job].members[role][actor_id] = (address, self._clock() + ttl)

    def deregister(self, job: str, role: str, actor_id: str) -> None:
        with self._lock:
            self._jobs[job].members[role].pop(actor_id, None)

    def members(self, job: str, role: str) -> dict[str, str]:
        with self._lock:
            now = self._clock()
            live = self._jobs[job].members[role]
            for dead in [k for k, (_, exp) in live.items() if exp <= now]:
                del live[dead]
            return {k: addr for k, (addr, _) in sorted(live.items())}

    # -- the aggregator pool ---------------------------------------------------------------
    def put_actor_load(self, job: str, actor_id: str, load: dict[str, Any]) -> None:
        with self._lock:
            self._jobs[job].loads[actor_id] = dict(load)

    def actor_loads(self, job: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in sorted(self._jobs[job].loads.items())}

    def set_draining(self, job: str, actor_ids: list[str]) -> None:
        with self._lock:
            self._jobs[job].draining = set(actor_ids)

    def draining(self, job: str) -> set[str]:
        with self._lock:
            return set(self._jobs[job].draining)

    # -- rounds ---------------------------------------------------------------------------------
    def put_round(self, job: str, token: int, state: RoundState) -> None:
        with self._lock:
            j = self._jobs[job]
            self._check_token(j, token)
            j.rounds[state.key] = state

    def rounds(self, job: str) -> list[RoundState]:
        with self._lock:
            return sorted(self._jobs[job].rounds.values(), key=lambda s: (s.round, s.attempt))

    def clear_round(self, job: str, round_key: str) -> None:
        with self._lock:
            j = self._jobs[job]
            j.rounds.pop(round_key, None)
            for key in [k for k in j.counts if k[0] == round_key]:
                del j.counts[key]
            j.partials.pop(round_key, None)
            j.claims.pop(round_key, None)

    # -- quotas and counters ----------------------------------------------------------------------
    def put_quotas(self, job: str, token: int, quotas: dict[str, Quota]) -> None:
        with self._lock:
            j = self._jobs[job]
            self._check_token(j, token)
            j.quotas.update(quotas)

    def quota(self, job: str, selector_id: str) -> Quota | None:
        with self._lock:
            return self._jobs[job].quotas.get(selector_id)

    def add_count(self, job: str, round_key: str, kind: str, actor_id: str, n: int) -> None:
        with self._lock:
            per = self._jobs[job].counts[(round_key, kind)]
            per[actor_id] = per.get(actor_id, 0) + n

    def claim_report(
        self, job: str, round_key: str, aggregator_id: str, goal: int, device_id: str
    ) -> Claim:
        with self._lock:
            j = self._jobs[job]
            prior = j.claims[round_key].get(device_id)
            if prior is not None:
                return prior
            per = j.counts[(round_key, "reported")]
            if sum(per.values()) >= goal:
                return Claim.full
            per[aggregator_id] = per.get(aggregator_id, 0) + 1
            j.claims[round_key][device_id] = Claim.reported
            return Claim.taken

    def claim_abort(self, job: str, round_key: str, device_id: str) -> bool:
        with self._lock:
            claims = self._jobs[job].claims[round_key]
            if device_id in claims:
                return False
            claims[device_id] = Claim.aborted
            return True

    def counts(self, job: str, round_key: str, kind: str) -> dict[str, int]:
        with self._lock:
            return dict(self._jobs[job].counts.get((round_key, kind), {}))

    # -- partial sums -----------------------------------------------------------------------------
    def put_partial(self, job: str, round_key: str, aggregator_id: str, data: bytes) -> None:
        with self._lock:
            self._jobs[job].partials[round_key][aggregator_id] = bytes(data)

    def partials(self, job: str, round_key: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._jobs[job].partials.get(round_key, {}))

    # -- checkpoints ------------------------------------------------------------------------------
    def commit_checkpoint(
        self,
        job: str,
        token: int,
        expected_version: int,
        round_: int,
        data: bytes,
        metrics: dict[str, Any],
    ) -> int:
        with self._lock:
            j = self._jobs[job]
            self._check_token(j, token)
            current = j.checkpoint.version if j.checkpoint else 0
            if current != expected_version:
                raise ConflictError(f"model version is {current}, expected {expected_version}")
            j.checkpoint = Checkpoint(current + 1, round_, bytes(data))
            j.metrics.append({**metrics, "round": round_, "model_version": current + 1})
            return current + 1

    def checkpoint(self, job: str) -> Checkpoint | None:
        with self._lock:
            return self._jobs[job].checkpoint

    def model_version(self, job: str) -> int:
        with self._lock:
            cp = self._jobs[job].checkpoint
            return cp.version if cp else 0

    def metrics(self, job: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(m) for m in self._jobs[job].metrics]

    def record_attempt(self, job: str, token: int, record: dict[str, Any]) -> None:
        with self._lock:
            j = self._jobs[job]
            self._check_token(j, token)
            j.attempts.append(dict(record))

    def attempts(self, job: str, start: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(a) for a in self._jobs[job].attempts[start:]]

    # -- job ------------------------------------------------------------------------------
    def put_job_state(self, job: str, token: int, state: dict[str, Any]) -> None:
        with self._lock:
            j = self._jobs[job]
            self._check_token(j, token)
            j.state = dict(state)

    def job_state(self, job: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._jobs[job].state) if job in self._jobs else {}

    def jobs(self) -> list[str]:
        with self._lock:
            return sorted(name for name, j in self._jobs.items() if j.state)

    def delete_job(self, job: str) -> int:
        with self._lock:
            return 1 if self._jobs.pop(job, None) is not None else 0

    # -- population -------------------------------------------------------------------------
    def _prune_revoked(self, population: str) -> dict[str, float]:
        revoked = self._revoked[population]
        cutoff = self._clock() - REVOCATION_KEEP_S
        for device in [d for d, at in revoked.items() if at < cutoff]:
            del revoked[device]
        return revoked

    def revoke_device(self, population: str, device_id: str, at: float) -> None:
        with self._lock:
            revoked = self._revoked[population]
            revoked[device_id] = max(float(at), revoked.get(device_id, float("-inf")))
            self._prune_revoked(population)

    def revoked_devices(self, population: str) -> dict[str, float]:
        with self._lock:
            return dict(self._prune_revoked(population)) if population in self._revoked else {}

    def announce_route(self, population: str, route: str, entry: str, ttl: float) -> None:
        with self._lock:
            self._routes[population][route] = (entry, self._clock() + ttl)

    def withdraw_route(self, population: str, route: str) -> None:
        with self._lock:
            self._routes[population].pop(route, None)

    def population_routes(self, population: str) -> dict[str, str]:
        with self._lock:
            if population not in self._routes:
                return {}
            now, live = self._clock(), self._routes[population]
            for dead in [r for r, (_, exp) in live.items() if exp <= now]:
                del live[dead]
            return {r: entry for r, (entry, _) in sorted(live.items())}

    def close(self) -> None:
        self._events.close()
