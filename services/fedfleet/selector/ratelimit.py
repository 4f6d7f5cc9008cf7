"""Token buckets that protect a selector: per device for check-ins, per selector for enrollment.

A real device's scheduler checks in when its reconnect window opens, at most every few minutes;
a device (or a stolen credential) checking in in a loop would cost the selector a credential
check and a selection decision each time. :class:`RateLimiter` keeps one bucket per key
(``rate`` tokens a second, at most ``burst``): a request that finds its bucket empty is refused
with the seconds until a token is back (the ``Retry-After``). The number of buckets is bounded:
past ``max_keys`` the least recently used one is forgotten (its key starts afresh with a full
bucket, which only ever errs on the side of letting a device in).

Pure: the time is passed in; a lock makes it safe from the event loop and worker threads.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

__all__ = ["RateLimit", "RateLimiter", "retry_after"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket's shape."""

    rate: float
    """Tokens added per second: the sustained requests per second allowed."""
    burst: float
    """Bucket size: the requests allowed at once after a quiet spell."""

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")


class RateLimiter:
    """Keyed token buckets (see the module doc)."""

    def __init__(self, limit: RateLimit, *, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}
        """key -> (tokens, at): insertion order is recency (a take re-inserts its key)."""
        self._lock = threading.Lock()

    def take(self, key: str, now: float) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if there was one, else the seconds until
        there will be (the request is refused and nothing is spent)."""
        rate, burst = self.limit.rate, self.limit.burst
        with self._lock:
            tokens, at = self._buckets.pop(key, (burst, now))
            tokens = min(burst, tokens + max(0.0, now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / rate
            while len(self._buckets) > self.max_keys:
                del self._buckets[next(iter(self._buckets))]
            return wait

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(wait: float) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1) for a wait of ``wait`` seconds."""
    return str(max(1, math.ceil(wait)))
