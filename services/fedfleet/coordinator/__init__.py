"""The Coordinator: one active per job (lease holder), driving rounds through the store."""

from fedfleet.coordinator.actor import AttemptEnd, Coordinator, CoordinatorSettings

__all__ = ["AttemptEnd", "Coordinator", "CoordinatorSettings"]
