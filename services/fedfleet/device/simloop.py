"""A discrete-event loop over simulated time: the embedded runner's clock.

The whole fleet and every actor run in one process, so nothing sleeps: events are kept in a
heap and time jumps to the next one. A day of check-ins takes as long as the work in it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

__all__ = ["SimLoop"]


class SimLoop:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self._seq), fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay, fn)

    def run_until(self, stop: Callable[[], bool], *, limit: float) -> None:
        """Run events in time order until ``stop()`` holds or time passes ``limit``."""
        heap = self._heap
        while heap and not stop():
            when, _, fn = heapq.heappop(heap)
            if when > limit:
                heapq.heappush(heap, (when, 0, fn))
                break
            self.now = when
            fn()
