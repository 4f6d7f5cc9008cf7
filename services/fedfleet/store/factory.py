"""Open a store from a URL: ``memory://`` or ``redis://`` / ``rediss://``."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse

from fedfleet.store.base import Store

__all__ = ["open_store"]


def open_store(url: str, *, clock: Callable[[], float] | None = None) -> Store:
    scheme = urlparse(url).scheme
    if scheme == "memory":
        from fedfleet.store.memory import MemoryStore

        return MemoryStore(clock=clock)
    if scheme in ("redis", "rediss", "unix"):
        try:
            from fedfleet.store.redis import RedisStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:  # pragma: no cover - until the Redis store lands
            raise ValueError(f"store URL {url!r}: Redis support is not available: {exc}") from exc
        store: Store = RedisStore.from_url(url)
        return store
    raise ValueError(f"store URL {url!r}: scheme must be memory://, redis:// or rediss://")
