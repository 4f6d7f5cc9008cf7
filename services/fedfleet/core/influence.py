"""Bounding one device's influence on a round: weight caps, norm bounds, robust folds.

Without differential privacy a report weighs as many examples as it claims and its update may
have any finite norm, so one device with valid credentials can dominate the average (claim a
million examples where devices hold seven) or push the model to float32's limit (values near
3e38, after which every honest update is non-finite against it). This module bounds both,
from what the population actually reports rather than from fixed guesses:

* :class:`InfluenceHistory` keeps the example counts and update norms of the last ``window``
  reports an aggregator accepted. A report's weight is capped at ``weightCapMultiple`` x the
  median count, and its update is clipped (scaled down, never refused) to a fixed
  ``normBound`` or to ``adaptiveNormMultiple`` x a quantile of the recent norms. Medians and
  quantiles move only when a large share of the reports move them, so a minority of liars
  cannot raise their own bound.
* :class:`BoundedFold` folds reports into a :class:`~fedfleet.core.aggregation.StreamingSum`
  with those bounds. While the history holds fewer than ``warmup`` reports (a fresh
  aggregator) it holds the reports back — at most ``warmup`` updates in memory — and folds
  them once the bounds are known, so even the very first round is bounded.
* :class:`RobustFold` is the optional coordinate-wise trimmed mean or median over an
  aggregator's group. It must hold every update of the group (O(group x model) memory, it
  cannot stream), weighs each report equally, and hands the master a partial sum like any
  other aggregator.

Everything here is pure: arrays in, arrays out.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.aggregation import StreamingSum
from fedfleet.core.dp import clip_update, update_norm
from fedfleet.core.models import Weights
from fedfleet.core.spec import RobustAggregator, RobustnessSpec

__all__ = [
    "BoundedFold",
    "InfluenceHistory",
    "InfluencePolicy",
    "RobustFold",
    "make_fold",
    "trimmed_mean",
]


@dataclass(frozen=True, slots=True)
class InfluencePolicy:
    """The bounds of :class:`BoundedFold`, taken from ``spec.aggregation.robustness``."""

    weight_cap_multiple: float | None = 2.0
    norm_bound: float | None = None
    adaptive_norm_multiple: float | None = 2.0
    adaptive_norm_quantile: float = 0.5
    window: int = 256
    warmup: int = 5

    @classmethod
    def from_spec(cls, spec: RobustnessSpec) -> InfluencePolicy:
        return cls(
            weight_cap_multiple=spec.weight_cap_multiple or None,
            norm_bound=spec.norm_bound,
            adaptive_norm_multiple=spec.adaptive_norm_multiple or None,
            adaptive_norm_quantile=spec.adaptive_norm_quantile,
            window=spec.history_window,
            warmup=spec.warmup_reports,
        )


class InfluenceHistory:
    """Example counts and update norms of the most recent reports (bounded windows)."""

    __slots__ = ("_counts", "_norms")

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._counts: deque[float] = deque(maxlen=window)
        self._norms: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._counts)

    def record(self, num_examples: float, norm: float) -> None:
        if not (math.isfinite(num_examples) and num_examples > 0 and math.isfinite(norm)):
            raise ValueError(f"cannot record {num_examples} examples of norm {norm}")
        self._counts.append(float(num_examples))
        self._norms.append(float(norm))

    def weight_cap(self, multiple: float | None) -> float | None:
        """``multiple`` x the median example count, or None (no history, or no cap)."""
        if multiple is None or not self._counts:
            return None
        return multiple * float(np.median(np.fromiter(self._counts, dtype=np.float64)))

    def norm_bound(self, multiple: float | None, quantile: float) -> float | None:
        """``multiple`` x the ``quantile`` of recent norms, or None. Never below a tiny floor,
        so a history of zero updates does not clip the next honest one to nothing."""
        if multiple is None or not self._norms:
            return None
        norms = np.fromiter(self._norms, dtype=np.float64)
        return max(multiple * float(np.quantile(norms, quantile)), 1e-12)


class BoundedFold:
    """A streaming fold whose every report has a capped weight and a bounded norm.

    ``add`` records the report's claimed count and norm in the (aggregator-lifetime)
    ``history`` and then folds it; while the history is shorter than ``policy.warmup`` the
    report is held back instead. ``finish`` folds whatever is held and returns the sum.
    ``clipped`` and ``capped`` count the reports the bounds changed (for metrics).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        policy: InfluencePolicy,
        history: InfluenceHistory,
    ) -> None:
        self.sum = StreamingSum(shapes)
        self.policy = policy
        self.history = history
        self._held: list[tuple[Weights, float]] = []
        self.clipped = 0
        self.capped = 0

    @property
    def count(self) -> int:
        """Reports taken, folded or held."""
        return self.sum.count + len(self._held)

    def add(self, update: Sequence[NDArray[np.float32]], num_examples: float) -> None:
        """Take one validated report (its arrays are copied when held, never kept as given)."""
        norm = update_norm(update)
        self.history.record(num_examples, norm)
        if len(self.history) < self.policy.warmup:
            self._held.append(([np.array(a, dtype=np.float32) for a in update], num_examples))
            return
        self._flush()
        self._fold(update, num_examples, norm)

    def finish(self) -> StreamingSum:
        self._flush()
        return self.sum

    def bounds(self) -> tuple[float | None, float | None]:
        """The current (weight cap, norm bound)."""
        p = self.policy
        norm = p.norm_bound
        if norm is None:
            norm = self.history.norm_bound(p.adaptive_norm_multiple, p.adaptive_norm_quantile)
        return self.history.weight_cap(p.weight_cap_multiple), norm

    def _flush(self) -> None:
        held, self._held = self._held, []
        for update, n in held:
            self._fold(update, n, update_norm(update))

    def _fold(self, update: Sequence[NDArray[np.float32]], n: float, norm: float) -> None:
        cap, bound = self.bounds()
        weight = n
        if cap is not None and n > cap:
            weight = cap
            self.capped += 1
        if bound is not None and norm > bound:
            update, _ = clip_update(update, bound)
            self.clipped += 1
        self.sum.add(update, weight, validated=True)


def trimmed_mean(stacked: NDArray[np.float32], trim_fraction: float) -> NDArray[np.float64]:
    """Coordinate-wise mean of ``stacked`` (reports along axis 0) after dropping the
    ``floor(trim_fraction x n)`` smallest and largest values of every coordinate (Yin et
    al., 2018); at least one value per coordinate always remains."""
    n = stacked.shape[0]
    if n == 0:
        raise ValueError("no updates to average")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    k = min(math.floor(trim_fraction * n), (n - 1) // 2)
    ordered = np.sort(stacked, axis=0)
    kept = ordered[k : n - k].astype(np.float64)
    return np.asarray(kept.mean(axis=0), dtype=np.float64)


class RobustFold:
    """Coordinate-wise trimmed mean or median over an aggregator's group.

    Holds every update of the group until ``finish`` (memory: reports x model size in
    float32, plus one sorted copy of the largest array). Updates are norm-bounded like
    :class:`BoundedFold`'s before they are held; example counts are ignored (each report
    weighs 1). The result is a partial sum of ``count`` reports whose mean is the robust
    estimate, so the master merges groups as usual (weighted by their report counts).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        policy: InfluencePolicy,
        history: InfluenceHistory,
        *,
        method: RobustAggregator,
        trim_fraction: float,
    ) -> None:
        self._shapes = [tuple(s) for s in shapes]
        self.policy = policy
        self.history = history
        self.method = method
        self.trim_fraction = trim_fraction
        self._held: list[Weights] = []
        self.clipped = 0
        self.capped = 0

    @property
    def count(self) -> int:
        return len(self._held)

    def add(self, update: Sequence[NDArray[np.float32]], num_examples: float) -> None:
        norm = update_norm(update)
        self.history.record(num_examples, norm)
        p = self.policy
        bound = p.norm_bound
        if bound is None and len(self.history) >= p.warmup:
            bound = self.history.norm_bound(p.adaptive_norm_multiple, p.adaptive_norm_quantile)
        if bound is not None and norm > bound:
            update, _ = clip_update(update, bound)
            self.clipped += 1
        self._held.append([np.array(a, dtype=np.float32) for a in update])

    def finish(self) -> StreamingSum:
        n = len(self._held)
        if n == 0:
            return StreamingSum(self._shapes)
        sums: list[NDArray[np.float64]] = []
        for i in range(len(self._shapes)):
            stacked = np.stack([u[i] for u in self._held])
            if self.method is RobustAggregator.median:
                center = np.median(stacked.astype(np.float64), axis=0)
            else:
                center = trimmed_mean(stacked, self.trim_fraction)
            sums.append(np.asarray(center * n, dtype=np.float64))
        self._held = []
        return StreamingSum.from_sums(self._shapes, sums, count=n, total_weight=float(n))


def make_fold(
    shapes: Sequence[tuple[int, ...]], spec: RobustnessSpec, history: InfluenceHistory
) -> BoundedFold | RobustFold:
    """The fold ``spec`` asks for, sharing the aggregator's ``history``."""
    policy = InfluencePolicy.from_spec(spec)
    if spec.aggregator is RobustAggregator.mean:
        return BoundedFold(shapes, policy, history)
    return RobustFold(
        shapes, policy, history, method=spec.aggregator, trim_fraction=spec.trim_fraction
    )
