"""Messages and round state shared by devices, actors and stores.

Plain frozen dataclasses with ``to_dict``/``from_dict`` so that the same values travel as JSON
over HTTP and sit as hashes in Redis; nothing here is pickled.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from fedfleet.core.metrics import MAX_METRICS, METRIC_NAME
from fedfleet.core.models import Weights
from fedfleet.core.spec import AggregationSpec, PlanSpec, TaskSpec

__all__ = [
    "SECAGG_FAILED",
    "SECAGG_STEPS",
    "SECAGG_STEP_PATTERN",
    "TERMINAL",
    "Assignment",
    "CheckIn",
    "Phase",
    "PrivacyPlan",
    "Quota",
    "Reconnect",
    "ReportEnvelope",
    "ReportRejected",
    "RoundState",
    "Task",
    "attempt_key",
    "report_ticket",
    "secagg_group_id",
    "secagg_message_limit",
    "verify_ticket",
]


@dataclass(frozen=True, slots=True)
class CheckIn:
    """What a device says when it checks in: who it is and whether it may work now."""

    device_id: str
    population: str
    charging: bool
    unmetered: bool
    idle: bool
    num_examples: int


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Pace steering's answer to a device that is not needed now: come back in this window."""

    not_before: float
    not_after: float
    reason: str = "not-needed"


@dataclass(frozen=True, slots=True)
class Assignment:
    """A device was selected for an attempt; it reports to ``aggregator`` with ``ticket``.

    The plan and checkpoint follow when the attempt is configured (after the previous round
    commits, since selection is pipelined).
    """

    round_key: str
    aggregator: str
    ticket: str


class Phase(StrEnum):
    selecting = "selecting"
    """Selectors are filling their quotas for this round."""
    waiting = "waiting"
    """Selection is done; the previous round has not committed yet (pipelining)."""
    reporting = "reporting"
    """Devices were configured and are training and reporting."""
    closing = "closing"
    """No more reports are accepted; aggregators ship partial sums to the master."""
    committed = "committed"
    abandoned = "abandoned"


TERMINAL = frozenset({Phase.committed, Phase.abandoned})


@dataclass(frozen=True, slots=True)
class RoundState:
    """One attempt at a round, as the coordinator publishes it in the store.

    ``attempt`` is a job-wide sequence number and the attempt's identity; ``round`` is the
    round it tries to commit, fixed when it is configured (selection for the next round starts
    before the current one commits, so its number is provisional until then).
    """

    round: int
    attempt: int
    phase: Phase
    target: int
    goal: int
    minimum: int
    selection_deadline: float
    reporting_deadline: float = 0.0
    closing_deadline: float = 0.0
    model_version: int = 0
    """Version of the checkpoint devices of this round train from (set when configured)."""
    aggregators: tuple[str, ...] = ()
    master: str = ""
    token: int = 0
    """The coordinator's fencing token; a commit carrying an older token is refused."""
    opened_at: float = 0.0
    reason: str = ""

    @property
    def key(self) -> str:
        return attempt_key(self.attempt)

    @property
    def active(self) -> bool:
        return self.phase not in TERMINAL

    def evolve(self, **changes: Any) -> RoundState:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phase"] = self.phase.value
        d["aggregators"] = list(self.aggregators)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundState:
        return cls(
            round=int(d["round"]),
            attempt=int(d["attempt"]),
            phase=Phase(d["phase"]),
            target=int(d["target"]),
            goal=int(d["goal"]),
            minimum=int(d["minimum"]),
            selection_deadline=float(d["selection_deadline"]),
            reporting_deadline=float(d.get("reporting_deadline", 0.0)),
            closing_deadline=float(d.get("closing_deadline", 0.0)),
            model_version=int(d.get("model_version", 0)),
            aggregators=tuple(d.get("aggregators", ())),
            master=str(d.get("master", "")),
            token=int(d.get("token", 0)),
            opened_at=float(d.get("opened_at", 0.0)),
            reason=str(d.get("reason", "")),
        )


@dataclass(frozen=True, slots=True)
class Quota:
    """How many devices one selector may still select for a round attempt.

    The coordinator pushes quotas in batches; a selector decides each check-in locally against
    the quota it holds (no store round trip per check-in).
    """

    round: int
    attempt: int
    count: int
    checkin_rate: float
    """Check-ins per second this selector should steer towards (pace steering)."""
    next_open: float
    """When selection for the next round is expected to open (concentrated windows)."""
    aggregators: tuple[str, ...] = field(default=())
    round_share: int = 0
    """This selector's share of a full round's target (pace steering's small-population test)."""
    counted: int = 0
    """Selections of this selector the coordinator had already counted when it split the
    quota; the selector may select ``count`` more beyond that (its own total is exact, the
    coordinator's view lags by one flush)."""
    round_seconds: float = 0.0
    """The coordinator's smoothed time between commits (before the first, how long the first
    round has taken so far; 0 before any selection); pace steering keeps a small
    population's windows within about one round of the next selection."""
    next_opening: float = 0.0
    """When the selection after ``attempt``'s (or the next, with none open) is expected to
    open: one measured round after the last commit (0: not known yet). Short rounds' pace
    steering sends devices it does not need to that opening or a later one."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aggregators"] = list(self.aggregators)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Quota:
        return cls(
            round=int(d["round"]),
            attempt=int(d["attempt"]),
            count=int(d["count"]),
            checkin_rate=float(d["checkin_rate"]),
            next_open=float(d["next_open"]),
            aggregators=tuple(d.get("aggregators", ())),
            round_share=int(d.get("round_share", 0)),
            counted=int(d.get("counted", 0)),
            round_seconds=float(d.get("round_seconds", 0.0)),
            next_opening=float(d.get("next_opening", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class PrivacyPlan:
    """What a configured device does to its update before anything leaves the device.

    ``weight_cap`` > 0 folds the capped weight min(examples / cap, 1) into the update;
    ``clip_norm`` clips the update's L2 norm (DP-FedAvg); ``secure_aggregation`` sends it only
    masked, through the Secure Aggregation protocol of the group ``group_id``.
    """

    weight_cap: int
    clip_norm: float | None = None
    secure_aggregation: bool = False
    group_id: str = ""
    min_group_size: int = 2
    threshold_fraction: float = 0.5
    clip_range: float = 1.0
    ring_bits: int = 32
    metric_names: tuple[str, ...] = ()
    """Device metrics that travel inside the masked vector (secure aggregation only)."""
    metric_range: float = 1000.0
    """Bound device metrics are clipped to before they are masked."""

    @classmethod
    def for_group(cls, spec: AggregationSpec, group_id: str) -> PrivacyPlan | None:
        """The plan of a job's aggregation spec (None when neither feature is on)."""
        if not spec.private:
            return None
        sa, dp = spec.secure_aggregation, spec.differential_privacy
        return cls(
            weight_cap=spec.example_weight_cap,
            clip_norm=dp.clip_norm if dp.enabled else None,
            secure_aggregation=sa.enabled,
            group_id=group_id if sa.enabled else "",
            min_group_size=sa.min_group_size,
            threshold_fraction=sa.threshold_fraction,
            clip_range=sa.clip_range,
            ring_bits=sa.ring_bits,
            metric_names=tuple(sa.metrics) if sa.enabled else (),
            metric_range=sa.metric_range,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metric_names"] = list(self.metric_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyPlan:
        """Strict: a device must not silently skip (or misread) a privacy step, so every field
        must have its exact type and range; anything else is a ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError("privacy plan must be an object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown privacy plan fields: {sorted(unknown)}")
        if "weight_cap" not in d:
            raise ValueError("privacy plan lacks weight_cap")

        def integer(name: str, default: int, lo: int, hi: int) -> int:
            v = d.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
            return v

        def number(name: str, default: float, lo: float, hi: float) -> float:
            v = d.get(name, default)
            ok = isinstance(v, int | float) and not isinstance(v, bool)
            if not ok or not (lo < float(v) <= hi):
                raise ValueError(f"{name} must be a number in ({lo}, {hi}], got {v!r}")
            return float(v)

        secure = d.get("secure_aggregation", False)
        if not isinstance(secure, bool):
            raise ValueError(f"secure_aggregation must be a boolean, got {secure!r}")
        group = d.get("group_id", "")
        if not isinstance(group, str) or len(group) > 1024:
            raise ValueError("group_id must be a string of at most 1024 characters")
        if secure and not group:
            raise ValueError("secure aggregation needs a group_id")
        ring = integer("ring_bits", 32, 32, 64)
        if ring not in (32, 64):
            raise ValueError(f"ring_bits must be 32 or 64, got {ring}")
        clip = d.get("clip_norm")
        threshold = number("threshold_fraction", 0.5, 0.0, 1.0)
        if not 0.5 <= threshold < 1.0:
            raise ValueError(f"threshold_fraction must be in [0.5, 1), got {threshold}")
        names = d.get("metric_names", [])
        if (
            not isinstance(names, list)
            or len(names) > MAX_METRICS
            or not all(isinstance(n, str) and METRIC_NAME.match(n) for n in names)
            or len(set(names)) != len(names)
        ):
            raise ValueError(
                f"metric_names must be at most {MAX_METRICS} distinct snake_case names"
            )
        return cls(
            metric_names=tuple(names),
            metric_range=number("metric_range", 1000.0, 0.0, 1e12),
            weight_cap=integer("weight_cap", 1, 1, 1_000_000),
            clip_norm=None if clip is None else number("clip_norm", 1.0, 0.0, 1e6),
            secure_aggregation=secure,
            group_id=group,
            min_group_size=integer("min_group_size", 2, 2, 1_000_000),
            threshold_fraction=threshold,
            clip_range=number("clip_range", 1.0, 0.0, 1e6),
            ring_bits=ring,
        )


SECAGG_FAILED = b"FFSECAGG-FAILED\n"
"""Prefix of the partial sum an aggregator publishes when its Secure Aggregation group failed
(the reason follows): the master commits nothing for the round and the coordinator abandons it
at once (reason ``secagg-group-failed``)."""

SECAGG_STEPS = ("advertise", "roster", "shares", "inbox", "masked", "survivors", "unmask")
"""The device's calls of one Secure Aggregation session, in order: each message it sends
(advertise, shares, masked, unmask) follows a poll for what the server published (roster,
inbox, survivors)."""


@dataclass(frozen=True, slots=True)
class Task:
    """What a configured device receives: the plan and the checkpoint to train from."""

    assignment: Assignment
    task: TaskSpec
    """The task to run (the device refuses one it does not have)."""
    plan: PlanSpec
    model_version: int
    weights: Weights
    privacy: PrivacyPlan | None = None
    evaluate: bool = False
    """Federated evaluation: also evaluate ``weights`` on the device's examples and report the
    metrics (``federated_<name>``)."""


class ReportRejected(Exception):
    """A report refused; ``status`` is the HTTP status the device API answers with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


def attempt_key(attempt: int) -> str:
    return f"a{attempt}"


@dataclass(frozen=True, slots=True)
class ReportEnvelope:
    """A device's report as it travels from the selector to its aggregator."""

    device_id: str
    round_key: str
    ticket: str
    num_examples: int
    update: bytes
    """The weights delta (local - global), encoded with fedfleet.core.serde."""
    metrics: dict[str, float] = field(default_factory=dict)


def report_ticket(secret: bytes, job: str, round_key: str, device_id: str) -> str:
    """The credential a selected device presents with its report (HMAC, stateless to check)."""
    msg = f"{job}\x00{round_key}\x00{device_id}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def verify_ticket(secret: bytes, job: str, round_key: str, device_id: str, ticket: str) -> bool:
    return hmac.compare_digest(report_ticket(secret, job, round_key, device_id), ticket)


SECAGG_STEP_PATTERN = "^(" + "|".join(SECAGG_STEPS) + ")$"
"""The ``{step}`` path segment of the secure-aggregation endpoints."""


def secagg_message_limit(spec: AggregationSpec) -> int:
    """Largest body of one secure-aggregation step: the masked vector is at most an update's
    size (``maxUpdateBytes``); keys and the encrypted shares of a large group get 1 MiB more."""
    return spec.max_update_bytes + (1 << 20)


def secagg_group_id(job: str, round_key: str, aggregator: str) -> str:
    """The identity of one Secure Aggregation session, bound into all of its keys: a message
    of one job, attempt or aggregator group is useless in any other."""
    return f"{job}/{round_key}/{aggregator}"
