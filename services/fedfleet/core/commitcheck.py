"""The master aggregator's last check before a model is committed.

Bounding each report (:mod:`fedfleet.core.influence`) limits what one device moves; this check
limits what a whole round may do, whatever got past the bounds (many colluding devices, a
bound configured too loose, a server optimizer that diverges). A candidate model must be
finite, and its L2 norm at most ``maxModelNormRatio`` times the committed model's. A refused
candidate is never written: the attempt is abandoned with the reason, and the committed model
stays bit for bit what it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.dp import update_norm

__all__ = [
    "COMMIT_ERROR_FIELD",
    "COMMIT_REFUSED_COUNT",
    "NORM_FLOOR",
    "CommitRefused",
    "check_commit",
]

COMMIT_ERROR_FIELD = "!commit-error"
"""Where, among an attempt's partial sums, the master publishes why it could not commit (no
aggregator id starts with ``!``); the coordinator abandons the attempt when it sees it."""
COMMIT_REFUSED_COUNT = "commit-refused"
"""The attempt counter the master bumps once it published a commit error: the coordinator
polls this small counter, and reads the (partial-sized) partials hash only once it is set."""

NORM_FLOOR = 1.0
"""A committed model of smaller norm (the zero initial softmax) is compared as if its norm
were this, so the first round may move away from zero."""


class CommitRefused(ValueError):
    """The candidate model must not be committed; the message says why."""


def check_commit(
    old: Sequence[NDArray[np.floating]],
    new: Sequence[NDArray[np.floating]],
    *,
    max_norm_ratio: float | None,
) -> float:
    """Raise :class:`CommitRefused` unless ``new`` may replace ``old``; return ``new``'s norm.

    ``max_norm_ratio`` None checks finiteness only.
    """
    if len(old) != len(new):
        raise CommitRefused(f"the new model has {len(new)} arrays, the committed one {len(old)}")
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        if a.shape != b.shape:
            raise CommitRefused(f"array {i} changed shape from {a.shape} to {b.shape}")
        if not np.isfinite(b).all():
            raise CommitRefused(f"the new model holds NaN or infinity (array {i})")
    norm = update_norm(new)
    if not math.isfinite(norm):
        raise CommitRefused("the new model's norm overflows")
    if max_norm_ratio is not None:
        reference = max(update_norm(old), NORM_FLOOR)
        if norm > max_norm_ratio * reference:
            raise CommitRefused(
                f"the new model's norm {norm:.4g} exceeds {max_norm_ratio:g} x the committed "
                f"model's {reference:.4g} (aggregation.robustness.maxModelNormRatio)"
            )
    return norm
