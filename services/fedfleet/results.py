"""What a job run produces, round by round: the rows of the report, the plot and the status.

Kept separate from the runner so that the CLI, the benchmark and (later) the operator read the
same record without importing the actors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = ["JobResult", "ProgressSink", "RoundRecord"]


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
            },
        }


class ProgressSink(Protocol):
    """Receives each round attempt as it ends (the CLI's live display implements it)."""

    def round_started(self, round_: int, selected: int) -> None: ...

    def round_ended(self, record: RoundRecord) -> None: ...
