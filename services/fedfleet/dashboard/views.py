"""What the dashboard shows, as small JSON documents built from the store's records.

:class:`JobReader` names the only store methods the dashboard calls, all of them reads, so the
dashboard cannot write to a job even by mistake (mypy holds it to this Protocol). The functions
here are pure: they take the records the coordinator wrote (the job record, finished attempts)
and coerce every field to the type the page expects, so a malformed record shows as missing
values rather than breaking the page.

Metrics pass through generically: every finite number in an attempt's metrics row (the
committed round's row, nested objects flattened as ``a.b``) is sent, so keys added to the
metrics rows later — device-reported loss and accuracy, federated evaluation — appear on the
page without a change here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlparse

__all__ = [
    "FINISHED_REASON",
    "JobReader",
    "attempt_row",
    "job_detail",
    "job_summary",
    "list_jobs",
    "numeric_metrics",
    "redact_store_url",
]

FINISHED_REASON = "job-finished"
"""An attempt cut short because the job ended (pipelined selection): not a round; not shown."""

MAX_ATTEMPTS_PER_PAGE = 2000
"""Attempts per answer; the page asks again from ``next`` while ``more`` is true."""

_MAX_METRIC_KEYS = 64
_MAX_KEY_LENGTH = 80
_MAX_DEPTH = 3
_AXES = frozenset({"round", "model_version"})
"""Keys of a metrics row that are its coordinates, not measurements."""


class JobReader(Protocol):
    """The read-only part of :class:`~fedfleet.store.base.Store` the dashboard uses."""

    def jobs(self) -> list[str]: ...

    def job_state(self, job: str) -> dict[str, Any]: ...

    def attempts(self, job: str, start: int = 0) -> list[dict[str, Any]]: ...


def _number(value: Any) -> float | None:
    """A finite float, or None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _int(value: Any, default: int = 0) -> int:
    number = _number(value)
    return default if number is None else int(number)


def _text(value: Any, limit: int = 200) -> str:
    return "" if value is None else str(value)[:limit]


def numeric_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """Every finite number of a metrics row, nested keys joined with dots; axes left out.

    Bounded (64 keys, keys up to 80 characters, three levels) so one odd row cannot bloat
    every answer.
    """
    out: dict[str, float] = {}

    def walk(node: Mapping[str, Any], prefix: str, depth: int) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if len(out) >= _MAX_METRIC_KEYS or len(name) > _MAX_KEY_LENGTH:
                continue
            if isinstance(value, Mapping):
                if depth < _MAX_DEPTH:
                    walk(value, f"{name}.", depth + 1)
                continue
            if depth == 1 and name in _AXES:
                continue
            number = _number(value)
            if number is not None:
                out[name] = number

    walk(row, "", 1)
    return out


def job_summary(key: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """One line of the jobs table: phase, committed rounds, the last round's metrics."""
    last = state.get("last_metrics")
    metrics = numeric_metrics(last) if isinstance(last, Mapping) else {}
    rounds = _number(state.get("rounds"))
    return {
        "key": key,
        "phase": _text(state.get("phase")) or "Unknown",
        "reason": _text(state.get("reason")),
        "round": _int(state.get("round")),
        "rounds": None if rounds is None else int(rounds),
        "model_version": _int(state.get("model_version")),
        "accuracy": metrics.get("accuracy"),
        "loss": metrics.get("loss"),
        "epsilon": metrics.get("epsilon"),
        "start_time": _number(state.get("start_time")),
        "completion_time": _number(state.get("completion_time")),
    }


def attempt_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One finished attempt: participants, outcome, duration and its numeric metrics."""
    opened, ended = _number(record.get("opened_at")), _number(record.get("ended_at"))
    metrics = record.get("metrics")
    return {
        "round": _int(record.get("round")),
        "attempt": _int(record.get("attempt")),
        "selected": _int(record.get("selected")),
        "reported": _int(record.get("reported")),
        "dropped": _int(record.get("dropped")),
        "abandoned": bool(record.get("abandoned")),
        "reason": _text(record.get("reason")),
        "ended_at": ended,
        "seconds": None if opened is None or ended is None else max(0.0, ended - opened),
        "model_version": _int(record.get("model_version")),
        "metrics": numeric_metrics(metrics) if isinstance(metrics, Mapping) else {},
    }


def list_jobs(reader: JobReader) -> list[dict[str, Any]]:
    """Every job of the store with its summary, sorted by key."""
    return [job_summary(key, reader.job_state(key)) for key in reader.jobs()]


def job_detail(reader: JobReader, key: str, start: int = 0) -> dict[str, Any] | None:
    """A job's summary and its attempts from index ``start`` on; None for an unknown job.

    ``next`` is the index to ask from next time (it counts the attempts not shown, those cut
    short by the job's end, so the page never sees one twice).
    """
    state = reader.job_state(key)
    records = reader.attempts(key, start)
    if not state and not records and start == 0:
        return None
    page = records[:MAX_ATTEMPTS_PER_PAGE]
    return {
        "job": job_summary(key, state),
        "start": start,
        "next": start + len(page),
        "more": len(records) > len(page),
        "attempts": [attempt_row(a) for a in page if a.get("reason") != FINISHED_REASON],
    }


def redact_store_url(url: str) -> str:
    """The store URL without its credentials or query (which may carry a password)."""
    parts = urlparse(url)
    if parts.scheme in ("redis", "rediss"):
        host = parts.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # not a port number: leave it out rather than echo the text
            port = ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://" if parts.scheme else "store"
