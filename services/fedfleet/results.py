"""What a job run produces, round by round: the rows of the report, the plot and the status.

Kept separate from the runner so that the CLI, the benchmark and (later) the operator read the
same record without importing the actors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fedfleet.core.model_history import CheckpointsSpec, best_version

__all__ = [
    "JobResult",
    "ProgressSink",
    "RoundRecord",
    "best_model_of",
    "device_metrics",
    "numeric_metrics",
]

DEVICE_METRIC_PREFIXES = ("train_", "federated_")
"""Metrics devices report, averaged per round by examples: training metrics (``train_loss``)
and federated evaluation of the global model on their own data (``federated_accuracy``)."""


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers among a commit's metrics."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def device_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The device-reported metrics among a commit's metrics."""
    return {
        k: v for k, v in numeric_metrics(metrics).items() if k.startswith(DEVICE_METRIC_PREFIXES)
    }


def best_model_of(history: list[dict[str, Any]], policy: CheckpointsSpec) -> dict[str, Any] | None:
    """The best committed model by ``spec.checkpoints.metric`` (kept when ``keepBest``)."""
    best = best_version(history, policy.metric, policy.mode) if policy.keep_best else None
    if best is None:
        return None
    return {"version": best.version, "round": best.round, policy.metric: best.value}


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One attempt at a round. An abandoned attempt commits nothing and is re-run."""

    round: int
    """Round number (1-based); an abandoned attempt is followed by another with the same number."""
    selected: int
    reported: int
    dropped: int
    abandoned: bool
    accuracy: float | None
    """Server-side evaluation after the commit (None when abandoned)."""
    loss: float | None
    seconds: float
    """Wall seconds this attempt took (simulated seconds are in sim_seconds)."""
    sim_seconds: float = 0.0
    model_version: int = 0
    reason: str = ""
    """Why the attempt was abandoned, empty when it committed."""
    epsilon: float | None = None
    """With differential privacy on: the job's epsilon after this round committed."""
    device_metrics: dict[str, float] = field(default_factory=dict)
    """Device-reported metrics averaged by examples (``train_*``; ``federated_*`` with
    federated evaluation on); empty when abandoned."""


@dataclass(slots=True)
class JobResult:
    job: str
    rounds: list[RoundRecord] = field(default_factory=list)
    wall_seconds: float = 0.0
    sim_seconds: float = 0.0
    model_version: int = 0
    final_accuracy: float | None = None
    final_loss: float | None = None
    succeeded: bool = False
    reason: str = ""
    """Why the job ended: 'rounds' (all rounds done), 'target' (target accuracy reached) or
    'epsilon-budget' (another round would exceed the privacy budget); when it failed,
    'commit-failures' (rounds.maxCommitFailures attempts in a row could not be committed)."""
    error: str = ""
    """When the job failed: the last error that stopped a commit."""
    epsilon: float | None = None
    """With differential privacy on: epsilon spent by the final model (at the job's delta)."""
    delta: float | None = None
    model_bytes: bytes = b""
    """The final global model, serialized with fedfleet.core.serde (no pickle)."""
    final_metrics: dict[str, float] = field(default_factory=dict)
    """Every metric of the last commit: server-side evaluation, device metrics, counts."""
    best_model: dict[str, Any] | None = None
    """The best kept model (version, round, metric value; see spec.checkpoints)."""

    def to_report(self) -> dict[str, Any]:
        """The JSON report: per-round rows and totals."""
        committed = [r for r in self.rounds if not r.abandoned]
        return {
            "job": self.job,
            "rounds": [asdict(r) for r in self.rounds],
            "totals": {
                "rounds": len(committed),
                "attempts": len(self.rounds),
                "abandoned": len(self.rounds) - len(committed),
                "final_accuracy": self.final_accuracy,
                "final_loss": self.final_loss,
                "model_version": self.model_version,
                "wall_seconds": self.wall_seconds,
                "sim_seconds": self.sim_seconds,
                "succeeded": self.succeeded,
                "reason": self.reason,
                "error": self.error,
                "epsilon": self.epsilon,
                "delta": self.delta,
                "metrics": self.final_metrics,
                "best_model": self.best_model,
            },
        }


class ProgressSink(Protocol):
    """Receives each round attempt as it ends (the CLI's live display implements it)."""

    def round_started(self, round_: int, selected: int) -> None: ...

    def round_ended(self, record: RoundRecord) -> None: ...
