"""Open a store from a URL: ``memory://`` or ``redis://`` / ``rediss://`` / ``unix://``.

The Redis store is imported only when asked for, so embedded runs never load redis-py.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse

from fedfleet.store.base import Store

__all__ = ["open_store"]


def open_store(url: str, *, clock: Callable[[], float] | None = None) -> Store:
    """The store a URL names; ``clock`` drives the memory store (Redis keeps its own time)."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        from fedfleet.store.memory import MemoryStore

        return MemoryStore(clock=clock)
    if scheme in ("redis", "rediss", "unix"):
        from fedfleet.store.redis import RedisStore

        return RedisStore.from_url(url)
    raise ValueError(f"store URL {url!r}: scheme must be memory://, redis://, rediss:// or unix://")
