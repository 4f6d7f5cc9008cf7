"""Where a job's privacy settings meet its updates: one place for device and server sides.

A device with a :class:`~fedfleet.core.protocol.PrivacyPlan` turns its model delta into what
may leave the device:

* **weighting** — with secure aggregation or DP on, a device's weight is the capped
  ``w = min(examples / cap, 1)`` of McMahan et al. (2018) instead of its raw example count,
  so no single device can dominate (or be singled out in) a sum;
* **clipping** (DP) — the delta's L2 norm is clipped to ``S`` before weighting, so every
  contribution ``w * clip(delta)`` has norm at most ``S`` (the sensitivity the master's noise
  is calibrated to);
* **secure aggregation** — the contribution travels as one vector
  ``[w * clip(delta) (flattened), w, metrics]`` through :mod:`fedfleet.core.secagg`; the
  aggregator only learns the group's sum of those vectors, which :func:`sum_from_secagg` turns
  back into a :class:`~fedfleet.core.aggregation.StreamingSum` (sums, total weight, count) and
  :func:`metrics_from_secagg` into the group's device metrics.

Device metrics under secure aggregation: each of the plan's ``metric_names`` takes two
coordinates, ``w * m * c / R`` and ``w`` (zeros when the device has no such metric), with ``m``
clipped to ``±R`` (``metric_range``) and ``c`` the fixed-point range, so every coordinate stays
inside it. The server learns only each group's ``sum w * m`` and ``sum w`` per metric — the same
aggregate-only view it has of the update — and records their ratio, the mean weighted by the
capped weight ``w`` (not by raw example counts, which the protocol hides).

Without secure aggregation the device sends its clipped delta as a normal report and the
aggregator weights (and re-clips: an honest device's update is unchanged by it) on receipt;
with it the server cannot check the bound, which is the protocol's known limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.aggregation import StreamingSum
from fedfleet.core.dp import capped_weight, clip_update
from fedfleet.core.metrics import MetricSums
from fedfleet.core.models import Weights
from fedfleet.core.protocol import PrivacyPlan
from fedfleet.core.secagg import SecAggParams

__all__ = [
    "metrics_from_secagg",
    "private_delta",
    "secagg_params",
    "secagg_vector",
    "sum_from_secagg",
    "vector_length",
]


def vector_length(shapes: Sequence[tuple[int, ...]], metrics: int = 0) -> int:
    """Entries of the secure-aggregation vector of a model: every weight, the weight, and two
    per device metric."""
    return sum(math.prod(s) for s in shapes) + 1 + 2 * metrics


def _fixed_range(plan: PrivacyPlan) -> float:
    """The fixed-point range: it covers the weight coordinate (at most 1) and, with DP on,
    nothing larger than the clip norm is possible in any coordinate of the update."""
    bound = plan.clip_range
    if plan.clip_norm is not None:
        bound = min(bound, plan.clip_norm)
    return max(bound, 1.0)


def secagg_params(plan: PrivacyPlan, shapes: Sequence[tuple[int, ...]]) -> SecAggParams:
    """The protocol parameters both sides derive from the same plan."""
    return SecAggParams(
        group_id=plan.group_id,
        vector_length=vector_length(shapes, len(plan.metric_names)),
        min_group_size=plan.min_group_size,
        threshold_fraction=plan.threshold_fraction,
        clip_range=_fixed_range(plan),
        ring_bits=plan.ring_bits,
    )


def private_delta(plan: PrivacyPlan, delta: Weights, num_examples: int) -> tuple[Weights, float]:
    """The clipped (when DP is on) delta and the device's capped weight."""
    if plan.clip_norm is not None:
        delta, _ = clip_update(delta, plan.clip_norm)
    return delta, capped_weight(num_examples, plan.weight_cap)


def secagg_vector(
    plan: PrivacyPlan,
    delta: Weights,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
) -> NDArray[np.float64]:
    """``[w * clip(delta) flattened, w, (w * m * c / R, w) per metric]`` in float64: the
    device's secure-aggregation input (``metrics``: the device's, by name; only the plan's
    ``metric_names`` are carried)."""
    clipped, w = private_delta(plan, delta, num_examples)
    size = sum(a.size for a in clipped)
    out = np.zeros(size + 1 + 2 * len(plan.metric_names), dtype=np.float64)
    pos = 0
    for arr in clipped:
        np.multiply(arr.reshape(-1), w, out=out[pos : pos + arr.size], dtype=np.float64)
        pos += arr.size
    out[size] = w
    scale = _fixed_range(plan) / plan.metric_range
    for i, name in enumerate(plan.metric_names):
        value = (metrics or {}).get(name)
        if value is None or not math.isfinite(value):
            continue
        clipped_value = min(max(float(value), -plan.metric_range), plan.metric_range)
        out[size + 1 + 2 * i] = w * clipped_value * scale
        out[size + 2 + 2 * i] = w
    return out


def _check_length(
    total: NDArray[np.float64], shapes: Sequence[tuple[int, ...]], plan: PrivacyPlan | None
) -> None:
    want = vector_length(shapes, 0 if plan is None else len(plan.metric_names))
    if total.shape != (want,):
        raise ValueError(f"secure sum has {total.shape} entries, expected {want}")


def metrics_from_secagg(
    total: NDArray[np.float64], shapes: Sequence[tuple[int, ...]], plan: PrivacyPlan
) -> MetricSums:
    """A group's unmasked sum's device metrics: ``sum w * m`` and ``sum w`` per metric that
    some device of the group reported."""
    _check_length(total, shapes, plan)
    start = sum(math.prod(s) for s in shapes) + 1
    scale = _fixed_range(plan) / plan.metric_range
    out = MetricSums()
    for i, name in enumerate(plan.metric_names):
        weighted, weight = float(total[start + 2 * i]), float(total[start + 2 * i + 1])
        if weight > 0:
            out.add_sum(name, weighted / scale, weight)
    return out


def sum_from_secagg(
    total: NDArray[np.float64],
    shapes: Sequence[tuple[int, ...]],
    count: int,
    plan: PrivacyPlan | None = None,
) -> StreamingSum:
    """A group's unmasked sum as a partial :class:`StreamingSum` for the master aggregator
    (``plan``: the one the vector was built with; None: a vector without metrics)."""
    _check_length(total, shapes, plan)
    sums: list[NDArray[np.float64]] = []
    pos = 0
    for shape in shapes:
        n = math.prod(shape)
        sums.append(np.array(total[pos : pos + n], dtype=np.float64).reshape(shape))
        pos += n
    return StreamingSum.from_sums(shapes, sums, count=count, total_weight=float(total[pos]))
