"""The store Protocol: everything actors share about a job, and nothing else.

Bonawitz et al. keep actor state in memory and use a shared locking/registration service for
the rest. The store is that service: the coordinator's **lease** with a fencing token, actor
**registrations** with heartbeats, **round state**, selector **quotas**, counters of selections
and reports, aggregators' **partial sums**, and **checkpoints** committed atomically together
with the version bump and the round's metrics. Both implementations (``memory`` for embedded
runs and tests, ``redis`` for deployments) are held to one contract suite in
``tests/contract``.

Writes that only the active coordinator (or the master aggregator acting for it) may make take
its fencing token; an implementation refuses them with :class:`FencedError` once a newer token
was issued, so a deposed coordinator that wakes up cannot move the job backwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from fedfleet.core.protocol import Quota, RoundState

__all__ = [
    "REVOCATION_KEEP_S",
    "Checkpoint",
    "Claim",
    "ConflictError",
    "FencedError",
    "Lease",
    "Store",
    "StoreUnavailable",
]


REVOCATION_KEEP_S = 31 * 86_400.0
"""How long a device revocation is kept: longer than any credential's lifetime (30 days), so
every credential it refuses has expired by the time it is forgotten."""


class FencedError(RuntimeError):
    """A write carried a fencing token older than the job's current lease."""


class ConflictError(RuntimeError):
    """A checkpoint commit expected a model version that is no longer current."""


class StoreUnavailable(ConnectionError):
    """The backing service cannot be reached; callers retry later (HTTP 503)."""


class Claim(StrEnum):
    """What :meth:`Store.claim_report` decided about one device's report for one attempt."""

    taken = "taken"
    """The report took one of the attempt's K slots."""
    reported = "reported"
    """The device already reported for this attempt (to this or another aggregator)."""
    aborted = "aborted"
    """The device aborted its task for this attempt; it may not report after all."""
    full = "full"
    """The attempt already has its K reports: the report is a straggler."""


@dataclass(frozen=True, slots=True)
class Lease:
    holder: str
    token: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class Checkpoint:
    version: int
    round: int
    data: bytes
    """Serialized model (and server optimizer state); see fedfleet.core.checkpoint."""


@runtime_checkable
class Store(Protocol):
    """Shared job state. All times are the store's clock (seconds); ttl values are seconds."""

    # -- coordinator lease ------------------------------------------------------------------
    def acquire_lease(self, job: str, holder: str, ttl: float) -> int | None:
        """Take the job's lease if free or expired; return a new, larger fencing token."""
        ...

    def renew_lease(self, job: str, holder: str, token: int, ttl: float) -> bool:
        """Extend a held lease; False if it expired and someone else holds it now."""
        ...

    def release_lease(self, job: str, holder: str, token: int) -> None: ...

    def lease(self, job: str) -> Lease | None: ...

    # -- actor registration -------------------------------------------------------------------
    def register(self, job: str, role: str, actor_id: str, address: str, ttl: float) -> None:
        """Register or heartbeat an actor; it disappears ``ttl`` seconds after the last one."""
        ...

    def deregister(self, job: str, role: str, actor_id: str) -> None: ...

    def members(self, job: str, role: str) -> dict[str, str]:
        """Live actors of a role: id -> address."""
        ...

    # -- the aggregator pool (fedfleet.core.autoscale) ----------------------------------------
    def put_actor_load(self, job: str, actor_id: str, load: dict[str, Any]) -> None:
        """An actor's latest measured load (rates, update size), replacing its last one."""
        ...

    def actor_loads(self, job: str) -> dict[str, dict[str, Any]]:
        """Every actor's latest load (including actors no longer registered)."""
        ...

    def set_draining(self, job: str, actor_ids: list[str]) -> None:
        """Replace the set of aggregators being drained: the coordinator gives them no new
        round (the operator removes them once they hold none)."""
        ...

    def draining(self, job: str) -> set[str]: ...

    # -- rounds -------------------------------------------------------------------------------
    def put_round(self, job: str, token: int, state: RoundState) -> None:
        """Publish a round attempt's state (fenced)."""
        ...

    def rounds(self, job: str) -> list[RoundState]:
        """Round attempts not yet cleared, oldest first."""
        ...

    def clear_round(self, job: str, round_key: str) -> None:
        """Drop a finished attempt's state, counters and partial sums."""
        ...

    # -- quotas and counters --------------------------------------------------------------------
    def put_quotas(self, job: str, token: int, quotas: dict[str, Quota]) -> None:
        """Replace the quotas of the named selectors (fenced)."""
        ...

    def quota(self, job: str, selector_id: str) -> Quota | None: ...

    def add_count(self, job: str, round_key: str, kind: str, actor_id: str, n: int) -> None:
        """Add an actor's batch to a per-attempt counter (kind: selected, reported, dropped)."""
        ...

    def counts(self, job: str, round_key: str, kind: str) -> dict[str, int]:
        """Per-actor totals of a counter for an attempt."""
        ...

    def claim_report(
        self, job: str, round_key: str, aggregator_id: str, goal: int, device_id: str
    ) -> Claim:
        """Count ``device_id``'s report unless the device already reported or aborted in this
        attempt, or the attempt already has ``goal`` reports (one atomic step).

        This is what closes a round at exactly K reports across all aggregators (a report
        that finds the round full is a straggler), and what makes a report count exactly once:
        the claim is per attempt and device, so a second aggregator of the round refuses a
        report the first one took.
        """
        ...

    def claim_abort(self, job: str, round_key: str, device_id: str) -> bool:
        """Record that ``device_id`` gave up its task in this attempt, unless it already
        reported or aborted (atomic, with :meth:`claim_report`): True when recorded now. A
        device that aborted can no longer report, so it is never both dropped and reported.
        """
        ...

    # -- partial sums -----------------------------------------------------------------------------
    def put_partial(self, job: str, round_key: str, aggregator_id: str, data: bytes) -> None: ...

    def partials(self, job: str, round_key: str) -> dict[str, bytes]: ...

    # -- checkpoints ---------------------------------------------------------------------------
    def commit_checkpoint(
        self,
        job: str,
        token: int,
        expected_version: int,
        round_: int,
        data: bytes,
        metrics: dict[str, Any],
    ) -> int:
        """Atomically store a checkpoint, bump the model version and append metrics.

        Refused with :class:`FencedError` for a stale token and :class:`ConflictError` when the
        current version is not ``expected_version``. Returns the new version.
        """
        ...

    def checkpoint(self, job: str) -> Checkpoint | None:
        """The newest committed checkpoint."""
        ...

    def model_version(self, job: str) -> int: ...

    def metrics(self, job: str) -> list[dict[str, Any]]:
        """Metrics of every committed round, oldest first."""
        ...

    def record_attempt(self, job: str, token: int, record: dict[str, Any]) -> None:
        """Append a finished attempt (committed or abandoned) to the job's history (fenced)."""
        ...

    def attempts(self, job: str, start: int = 0) -> list[dict[str, Any]]:
        """Finished attempts from index ``start`` on, oldest first."""
        ...

    # -- job-level --------------------------------------------------------------------------------
    def put_job_state(self, job: str, token: int, state: dict[str, Any]) -> None:
        """Small job-level record (phase, reason, timings) the operator reads (fenced)."""
        ...

    def job_state(self, job: str) -> dict[str, Any]: ...

    def jobs(self) -> list[str]:
        """Keys of the jobs that have a job-level record (:meth:`put_job_state`), sorted.

        Read-only listing for dashboards; a job whose keys were deleted is not listed.
        """
        ...

    def delete_job(self, job: str) -> int:
        """Remove every key of the job; returns how many were removed."""
        ...

    # -- population (device enrollment; fedfleet.service.enrollment) ---------------------------
    def revoke_device(self, population: str, device_id: str, at: float) -> None:
        """Refuse every credential of ``device_id`` in ``population`` issued at or before
        ``at`` (Unix seconds). The latest ``at`` of a device wins; a revocation is forgotten
        :data:`REVOCATION_KEEP_S` after its ``at`` (the store's clock), when all it refuses
        has expired. Population-scoped: no job's deletion removes it."""
        ...

    def revoked_devices(self, population: str) -> dict[str, float]:
        """The population's kept revocations: device id -> ``at``."""
        ...

    def announce_route(self, population: str, route: str, entry: str, ttl: float) -> None:
        """Announce (or refresh) one of the population's routes for ``ttl`` seconds: a job's
        selector the population's gateway may send devices to (``entry`` is its JSON
        description, :mod:`fedfleet.gateway.routes`). Population-scoped, like revocations."""
        ...

    def withdraw_route(self, population: str, route: str) -> None:
        """Remove a route at once (a selector shutting down)."""
        ...

    def population_routes(self, population: str) -> dict[str, str]:
        """The population's live routes: route id -> entry; expired ones are dropped."""
        ...

    def close(self) -> None: ...
