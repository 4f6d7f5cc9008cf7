"""The store as one coordinator tick reads it: each read made once until the tick writes.

The coordinator's tick reads the same keys many times (the rounds, their counters, the model
version): about 120 store calls a round when each read went to the store.
"""

from __future__ import annotations

from typing import Any

from fedfleet.store.base import Store

__all__ = ["TickReads"]


class TickReads:
    """The store as one tick of the coordinator sees it: each read (same method, same
    arguments) is made once and remembered until the tick writes anything, which forgets them
    all. Other actors' writes during the tick show at the next tick, as they would if they
    landed a moment later; every event still pokes a next tick, so none is missed.
    """

    _READS = frozenset(
        {"rounds", "counts", "model_version", "job_state", "members", "draining", "metrics"}
    )

    def __init__(self, store: Store) -> None:
        self._store = store
        self._memo: dict[tuple[Any, ...], Any] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if not callable(method):
            return method
        memo = self._memo
        if name in self._READS:

            def read(*args: Any) -> Any:
                key = (name, *args)
                if key not in memo:
                    memo[key] = method(*args)
                return memo[key]

            return read

        def write(*args: Any, **kwargs: Any) -> Any:
            memo.clear()
            return method(*args, **kwargs)

        return write
