"""The device scheduler's decisions, as pure functions of the time and a random generator.

A real device must never hammer a server that is down or busy (a fleet of them would keep it
down), must not check in before the window the server gave it, and must spread its returns
so thousands of devices do not come back in the same second (the pick inside a reconnect
window is ``FLRuntime.on_reconnect``). These are the rules
:class:`~fedfleet.device.agent.DeviceAgent` follows; they take ``now`` and an ``rng`` so the
unit tests check them exactly, without sleeping.
"""

from __future__ import annotations

import math
import random

from fedfleet.device.state import Identity

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "backoff_delay",
    "renew_due",
    "retry_after_delay",
]

BACKOFF_MIN = 1.0
"""Seconds before the first retry after a connection error or a server error."""
BACKOFF_MAX = 60.0
"""The longest wait between retries: a selector that comes back is found within a minute."""


def backoff_delay(
    failures: int,
    rng: random.Random,
    *,
    low: float = BACKOFF_MIN,
    high: float = BACKOFF_MAX,
) -> float:
    """The wait after ``failures`` consecutive failures (1 = the first): exponential from
    ``low`` up to ``high``, with jitter in its upper half so retrying devices spread out;
    never below ``low`` nor above ``high``."""
    n = max(1, failures)
    ceiling = min(high, low * 2.0 ** min(n - 1, 32))
    return max(low, rng.uniform(ceiling / 2.0, ceiling))


def retry_after_delay(retry_after: float | None, failures: int, rng: random.Random) -> float:
    """The wait after a 503 / 429: the server's ``Retry-After`` plus up to 20% jitter (never
    sooner than it asked), or the exponential backoff when it gave none."""
    if retry_after is None or not math.isfinite(retry_after) or retry_after < 0:
        return backoff_delay(failures, rng)
    return retry_after * (1.0 + 0.2 * rng.random())


def renew_due(identity: Identity, now: float) -> bool:
    """Renew once half the credential's lifetime has passed (``renew_after``)."""
    return now >= identity.renew_after
