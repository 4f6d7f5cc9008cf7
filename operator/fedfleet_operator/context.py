"""What every handler needs, built once per operator process and handed over in kopf's memo.

kopf gives each handler a ``memo``: a shallow copy of the operator-wide memo made when it first
sees an object. The :class:`OperatorContext` stored there under :data:`MEMO_KEY` is therefore
shared by all objects: one settings object, one Kubernetes client, one store connection pool.
Tests build a context with fakes and pass it the same way, so the handlers are exercised
without a cluster or a Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from fedfleet.store.base import Store
from fedfleet_operator.events import EventSink
from fedfleet_operator.kube import ChildClient
from fedfleet_operator.settings import OperatorSettings

__all__ = ["MEMO_KEY", "OperatorContext", "context_of", "utcnow"]

MEMO_KEY: Final = "fedfleet"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class OperatorContext:
    settings: OperatorSettings
    kube: ChildClient
    store: Store
    """The store every job's actors use (``FEDFLEET_STORE_URL``); thread-safe, shared."""
    events: EventSink
    clock: Callable[[], datetime] = field(default=utcnow)
    """Source of ``now`` for condition transition times."""


def context_of(memo: Mapping[str, Any]) -> OperatorContext:
    """The context in a kopf memo; a clear error when the operator was started without one."""
    ctx = memo.get(MEMO_KEY)
    if not isinstance(ctx, OperatorContext):
        raise RuntimeError(
            "no fedfleet OperatorContext in kopf's memo: start the operator with "
            "`fedfleet operator` (fedfleet_operator.main.run)"
        )
    return ctx
