"""Names of actor roles and job phases, shared by actors, stores and the operator."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = ["DEADLINE_EXCEEDED", "JobPhase", "Role"]

DEADLINE_EXCEEDED: Final = "deadline-exceeded"
"""The job record's ``reason`` when ``spec.activeDeadlineSeconds`` ended the job (Failed),
written by the coordinator or, when none runs, by the operator; shown as DeadlineExceeded."""


class Role(StrEnum):
    coordinator = "coordinator"
    selector = "selector"
    aggregator = "aggregator"


class JobPhase(StrEnum):
    pending = "Pending"
    running = "Running"
    suspended = "Suspended"
    succeeded = "Succeeded"
    failed = "Failed"
