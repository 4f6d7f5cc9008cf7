"""An actor's registration in the store, renewed on its tick.

Selectors and aggregators are found through their registrations (id -> address); one that
stops heart-beating disappears after ``ttl`` seconds, which is how a crashed actor leaves
the rounds the coordinator opens next.
"""

from __future__ import annotations

from fedfleet.store.base import Store

__all__ = ["Registration"]


class Registration:
    def __init__(
        self,
        store: Store,
        job: str,
        role: str,
        actor_id: str,
        address: str,
        *,
        every: float = 2.0,
        ttl: float = 10.0,
    ) -> None:
        self.store, self.job, self.role = store, job, role
        self.actor_id, self.address = actor_id, address
        self.every = every
        """Seconds between heartbeats."""
        self.ttl = ttl
        """Seconds the registration outlives the last heartbeat."""
        self._last = float("-inf")

    def beat(self, now: float) -> None:
        """Register again if a heartbeat is due (call on every tick)."""
        if now - self._last >= self.every:
            self.store.register(self.job, self.role, self.actor_id, self.address, self.ttl)
            self._last = now
