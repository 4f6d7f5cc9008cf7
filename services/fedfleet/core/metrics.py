"""Device-reported metrics, averaged per round by examples (training and federated evaluation).

Devices report a few named numbers with their update (``train_loss``, ``federated_accuracy``,
...). Like updates, they are folded into running sums as they arrive — ``sum_k n_k * m_k`` and
``sum_k n_k`` per name, with ``n_k`` the report's example count — so an aggregator holds O(names)
and the master merges the aggregators' sums into per-round weighted means. What a device sends is
hostile input: :func:`parse_metrics` bounds the number of names, their spelling and the values.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "MAX_METRICS",
    "METRIC_NAME",
    "MetricSums",
    "MetricsRejected",
    "parse_metrics",
    "validate_metrics",
]

MAX_METRICS: Final = 32
"""Most metrics one report may carry."""
METRIC_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
"""How a device metric may be spelled."""
_NAME = METRIC_NAME
_LIMIT = 1e15
_MAX_TEXT = 4096


class MetricsRejected(ValueError):
    """Metrics that are not a small mapping of snake_case names to finite numbers."""


def validate_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``metrics`` as floats, or :class:`MetricsRejected`."""
    if len(metrics) > MAX_METRICS:
        raise MetricsRejected(f"at most {MAX_METRICS} metrics, got {len(metrics)}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise MetricsRejected(f"metric name {name!r} is not snake_case of up to 64 characters")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MetricsRejected(f"metric {name} is not a number")
        v = float(value)
        if not (math.isfinite(v) and abs(v) <= _LIMIT):
            raise MetricsRejected(f"metric {name} is not a finite number of at most {_LIMIT:g}")
        out[name] = v
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """The ``x-fedfleet-metrics`` header: a JSON object of name to number."""
    if len(text) > _MAX_TEXT:
        raise MetricsRejected(f"metrics exceed {_MAX_TEXT} characters")
    try:
        doc = json.loads(text)
    except ValueError:
        raise MetricsRejected("metrics are not JSON") from None
    if not isinstance(doc, dict):
        raise MetricsRejected("metrics must be a JSON object")
    return validate_metrics(doc)


class MetricSums:
    """Running example-weighted sums of device metrics for one round."""

    __slots__ = ("_sums",)

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        for name, value in metrics.items():
            acc = self._sums.setdefault(name, [0.0, 0.0])
            acc[0] += weight * value
            acc[1] += weight

    def add_sum(self, name: str, total: float, weight: float) -> None:
        """Fold in an already weighted sum (``sum w * m``, ``sum w``) of one metric."""
        acc = self._sums.setdefault(name, [0.0, 0.0])
        acc[0] += total
        acc[1] += weight

    def merge(self, other: MetricSums) -> None:
        for name, (total, weight) in other._sums.items():
            acc = self._sums.setdefault(name, [0.0, 0.0])
            acc[0] += total
            acc[1] += weight

    def means(self) -> dict[str, float]:
        return {k: total / w for k, (total, w) in sorted(self._sums.items()) if w > 0}

    def to_bytes(self) -> bytes:
        return json.dumps(self._sums, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> MetricSums:
        """Parse what :meth:`to_bytes` wrote (another aggregator's sums); bad input is ignored
        name by name, since the metrics are informative and must not block a commit."""
        out = cls()
        try:
            doc = json.loads(data)
        except ValueError:
            return out
        if isinstance(doc, dict):
            for name, pair in list(doc.items())[: 4 * MAX_METRICS]:
                if (
                    isinstance(name, str)
                    and _NAME.match(name)
                    and isinstance(pair, list)
                    and len(pair) == 2
                    and all(isinstance(v, int | float) and math.isfinite(v) for v in pair)
                ):
                    out._sums[name] = [float(pair[0]), float(pair[1])]
        return out
