"""Model weights as the server sees them: a list of float32 arrays, and their arithmetic.

The server never knows which model produced the weights: the user's task (``fedfleet.tasks``)
defines the arrays, and everything here — aggregation, serialization, server optimizers,
checkpoints — works on ``[array_0, array_1, ...]`` in the task's fixed order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

__all__ = ["TrainingAborted", "Weights", "apply_delta", "delta", "shapes_of"]

Weights: TypeAlias = list[NDArray[np.float32]]
"""Model parameters as float32 arrays in the task's fixed order."""


class TrainingAborted(RuntimeError):
    """Local training stopped because ``should_continue`` said no (the device lost
    eligibility mid-task, Bonawitz et al. section 3); no result exists."""


def shapes_of(weights: Sequence[NDArray[Any]]) -> list[tuple[int, ...]]:
    """The shape of each array, in order (what updates and checkpoints are checked against)."""
    return [tuple(int(d) for d in w.shape) for w in weights]


def delta(new: Sequence[NDArray[np.float32]], old: Sequence[NDArray[np.float32]]) -> Weights:
    """The update a device reports: ``new - old`` per array (float32)."""
    if len(new) != len(old):
        raise ValueError(f"cannot subtract {len(old)} arrays from {len(new)}")
    out: Weights = []
    for a, b in zip(new, old, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
        out.append(np.subtract(a, b, dtype=np.float32))
    return out


def apply_delta(
    weights: Sequence[NDArray[np.float32]],
    update: Sequence[NDArray[np.floating[Any]]],
    scale: float = 1.0,
) -> Weights:
    """``weights + scale * update`` per array, as new float32 arrays."""
    if len(weights) != len(update):
        raise ValueError(f"cannot apply {len(update)} arrays to {len(weights)}")
    out: Weights = []
    for w, d in zip(weights, update, strict=True):
        if w.shape != d.shape:
            raise ValueError(f"shape mismatch: {w.shape} vs {d.shape}")
        step = d * scale if scale != 1.0 else d
        out.append(np.add(w, step, dtype=np.float32, casting="same_kind"))
    return out
