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
  ``[w * clip(delta) (flattened), w]`` through :mod:`fedfleet.core.secagg`; the aggregator only
  learns the group's sum of those vectors, which :func:`sum_from_secagg` turns back into a
  :class:`~fedfleet.core.aggregation.StreamingSum` (sums, total weight, count).

Without secure aggregation the device sends its clipped delta as a normal report and the
aggregator weights (and re-clips: an honest device's update is unchanged by it) on receipt;
with it the server cannot check the bound, which is the protocol's known limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.aggregation import StreamingSum
from fedfleet.core.dp import capped_weight, clip_update
from fedfleet.core.models import Weights
from fedfleet.core.protocol import PrivacyPlan
from fedfleet.core.secagg import SecAggParams

__all__ = [
    "private_delta",
    "secagg_params",
    "secagg_vector",
    "sum_from_secagg",
    "vector_length",
]


def vector_length(shapes: Sequence[tuple[int, ...]]) -> int:
    """Entries of the secure-aggregation vector of a model: every weight, plus the weight."""
    return sum(math.prod(s) for s in shapes) + 1


def secagg_params(plan: PrivacyPlan, shapes: Sequence[tuple[int, ...]]) -> SecAggParams:
    """The protocol parameters both sides derive from the same plan.

    The fixed-point range covers the weight coordinate (at most 1) and, with DP on, nothing
    larger than the clip norm is possible in any coordinate, so the tighter range is used.
    """
    bound = plan.clip_range
    if plan.clip_norm is not None:
        bound = min(bound, plan.clip_norm)
    return SecAggParams(
        group_id=plan.group_id,
        vector_length=vector_length(shapes),
        min_group_size=plan.min_group_size,
        threshold_fraction=plan.threshold_fraction,
        clip_range=max(bound, 1.0),
        ring_bits=plan.ring_bits,
    )


def private_delta(plan: PrivacyPlan, delta: Weights, num_examples: int) -> tuple[Weights, float]:
    """The clipped (when DP is on) delta and the device's capped weight."""
    if plan.clip_norm is not None:
        delta, _ = clip_update(delta, plan.clip_norm)
    return delta, capped_weight(num_examples, plan.weight_cap)


def secagg_vector(plan: PrivacyPlan, delta: Weights, num_examples: int) -> NDArray[np.float64]:
    """``[w * clip(delta) flattened, w]`` in float64: the device's secure-aggregation input."""
    clipped, w = private_delta(plan, delta, num_examples)
    size = sum(a.size for a in clipped)
    out = np.empty(size + 1, dtype=np.float64)
    pos = 0
    for arr in clipped:
        np.multiply(arr.reshape(-1), w, out=out[pos : pos + arr.size], dtype=np.float64)
        pos += arr.size
    out[size] = w
    return out


def sum_from_secagg(
    total: NDArray[np.float64], shapes: Sequence[tuple[int, ...]], count: int
) -> StreamingSum:
    """A group's unmasked sum as a partial :class:`StreamingSum` for the master aggregator."""
    if total.shape != (vector_length(shapes),):
        raise ValueError(f"secure sum has {total.shape} entries, expected {vector_length(shapes)}")
    sums: list[NDArray[np.float64]] = []
    pos = 0
    for shape in shapes:
        n = math.prod(shape)
        sums.append(np.array(total[pos : pos + n], dtype=np.float64).reshape(shape))
        pos += n
    return StreamingSum.from_sums(shapes, sums, count=count, total_weight=float(total[-1]))
