"""Models in the job's own store: Redis in a deployment, memory in ``fedfleet run``.

The default backend, for small models: each object is one Redis string under
``fedfleet-models:{<job>}:<name>``, its name in the set ``fedfleet-models:{<job>}`` (listing
never SCANs the keyspace) — outside the job's ``fedfleet:{<job>}:`` keys, so removing the
job's record (``Store.delete_job``) leaves its models unless ``deleteWithJob`` is set. A write
is as durable as the Redis it goes to (its persistence settings), and it completes before the
pointer is committed. The in-memory variant lives as long as its :class:`MemoryStore`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, cast

from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.history.base import (
    ModelMissing,
    ModelStorage,
    ModelStorageError,
    check_job,
    check_name,
)

__all__ = ["MODELS_PREFIX", "MemoryModels", "RedisModels", "models_in_store"]

MODELS_PREFIX = "fedfleet-models"


class RedisModels:
    """Objects as Redis strings, and the set of their names (no SCAN over the keyspace)."""

    def __init__(self, client: Any, *, prefix: str = MODELS_PREFIX, where: str = "redis") -> None:
        self._r = client
        self._prefix = prefix
        self._where = where

    def location(self) -> dict[str, Any]:
        return {"kind": "redis"}

    def describe(self) -> str:
        return f"the store ({self._where})"

    def _key(self, job: str, name: str) -> str:
        return f"{self._prefix}:{{{check_job(job)}}}:{check_name(name)}"

    def _names_key(self, job: str) -> str:
        return f"{self._prefix}:{{{check_job(job)}}}"

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return fn(*args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise StoreUnavailable(f"redis is unavailable: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise ModelStorageError(f"{what} in {self.describe()}: {exc}") from exc

    def _atomically(self, what: str, *commands: tuple[str, tuple[Any, ...]]) -> list[Any]:
        def run() -> list[Any]:
            pipe = self._r.pipeline(transaction=True)  # one hash slot: the job's tag
            for name, args in commands:
                getattr(pipe, name)(*args)
            return cast(list[Any], pipe.execute())

        return cast(list[Any], self._call(what, run))

    def put(self, job: str, name: str, data: bytes) -> None:
        self._atomically(
            f"storing {job}/{name}",
            ("set", (self._key(job, name), bytes(data))),
            ("sadd", (self._names_key(job), name)),
        )

    def get(self, job: str, name: str) -> bytes:
        raw = self._call(f"reading {job}/{name}", self._r.get, self._key(job, name))
        if raw is None:
            raise ModelMissing(f"no {job}/{name} in {self.describe()}")
        return bytes(raw)

    def delete(self, job: str, name: str) -> None:
        self._atomically(
            f"deleting {job}/{name}",
            ("unlink", (self._key(job, name),)),
            ("srem", (self._names_key(job), name)),
        )

    def names(self, job: str) -> list[str]:
        raw = self._call("listing", self._r.smembers, self._names_key(job))
        return sorted(bytes(n).decode() for n in raw)

    def delete_job(self, job: str) -> int:
        names = self.names(job)
        keys = [self._key(job, n) for n in names]
        self._atomically(f"deleting {job}", ("unlink", (*keys, self._names_key(job))))
        return len(names)

    def close(self) -> None:
        pass


class MemoryModels:
    """Objects in a dict: the models of a :class:`MemoryStore`, for embedded runs and tests."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def location(self) -> dict[str, Any]:
        return {"kind": "redis"}

    def describe(self) -> str:
        return "the store (memory)"

    def put(self, job: str, name: str, data: bytes) -> None:
        with self._lock:
            self._objects[check_job(job), check_name(name)] = bytes(data)

    def get(self, job: str, name: str) -> bytes:
        with self._lock:
            try:
                return self._objects[check_job(job), check_name(name)]
            except KeyError:
                raise ModelMissing(f"no {job}/{name} in memory") from None

    def delete(self, job: str, name: str) -> None:
        with self._lock:
            self._objects.pop((check_job(job), check_name(name)), None)

    def names(self, job: str) -> list[str]:
        with self._lock:
            return sorted(n for j, n in self._objects if j == check_job(job))

    def delete_job(self, job: str) -> int:
        with self._lock:
            gone = [k for k in self._objects if k[0] == check_job(job)]
            for k in gone:
                del self._objects[k]
            return len(gone)

    def close(self) -> None:
        pass


_memory: weakref.WeakKeyDictionary[Store, MemoryModels] = weakref.WeakKeyDictionary()
_memory_lock = threading.Lock()


def models_in_store(store: Store) -> ModelStorage:
    """The models kept in the job's store itself (``storage.kind: redis``)."""
    client = getattr(store, "client", None)  # a RedisStore (redis-py is not imported here)
    if client is not None:
        return RedisModels(client)
    # The actors of one process share one memory store, each through its own wrappers.
    store = getattr(store, "unwrapped", store)
    with _memory_lock:
        models = _memory.get(store)
        if models is None:
            models = _memory[store] = MemoryModels()
        return models
