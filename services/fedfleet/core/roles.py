"""Names of actor roles and job phases, shared by actors, stores and the operator."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["JobPhase", "Role"]


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
