"""Kubernetes Events about an FLJob, behind a Protocol.

In the operator they are posted by kopf (:func:`kopf.warn`, :func:`kopf.info`), which queues
them and posts them in the background with retries. Handlers go through :class:`EventSink` so
unit tests can record them without kopf's event loop.
"""

from __future__ import annotations

from typing import Final, Protocol

import kopf

__all__ = ["MAX_MESSAGE", "EventSink", "KopfEvents"]


class EventSink(Protocol):
    def info(self, body: kopf.Body, *, reason: str, message: str) -> None: ...

    def warn(self, body: kopf.Body, *, reason: str, message: str) -> None: ...


MAX_MESSAGE: Final = 1024
"""Event notes longer than this are cut: the events.k8s.io API refuses notes over 1 kB."""


def _cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


class KopfEvents:
    """:class:`EventSink` posting through kopf (Events need RBAC ``events: create``)."""

    def info(self, body: kopf.Body, *, reason: str, message: str) -> None:
        kopf.info(body, reason=reason, message=_cut(message))

    def warn(self, body: kopf.Body, *, reason: str, message: str) -> None:
        kopf.warn(body, reason=reason, message=_cut(message))
