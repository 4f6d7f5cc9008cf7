"""Checkpoint format: the global model plus the server optimizer's state, no pickle.

A checkpoint is one :func:`fedfleet.core.serde.encode_state` blob with arrays named
``w/0..n`` (the model, in the task's order) and ``opt/<name>`` (optimizer state), so a
coordinator or master that restarts continues the server optimizer exactly where the last commit
left it. Version 0 is never stored: it is the task's deterministic initial weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.models import Weights
from fedfleet.core.serde import decode_state, encode_state

__all__ = ["pack_checkpoint", "unpack_checkpoint"]


def pack_checkpoint(weights: Weights, optimizer_state: dict[str, NDArray[np.generic]]) -> bytes:
    named: dict[str, NDArray[np.generic]] = {f"w/{i}": w for i, w in enumerate(weights)}
    named.update({f"opt/{k}": v for k, v in optimizer_state.items()})
    return encode_state(named)


def unpack_checkpoint(
    data: bytes, shapes: Sequence[tuple[int, ...]]
) -> tuple[Weights, dict[str, NDArray[np.generic]]]:
    """Decode and check a checkpoint against the model's array shapes (ValueError if not)."""
    named = decode_state(data)
    weights: Weights = []
    for i, shape in enumerate(shapes):
        arr = named.get(f"w/{i}")
        if arr is None or arr.shape != tuple(shape) or arr.dtype != np.float32:
            raise ValueError(f"checkpoint does not match the model: layer {i} expected {shape}")
        weights.append(arr.astype(np.float32, copy=False))
    if f"w/{len(shapes)}" in named:
        raise ValueError("checkpoint has more layers than the model")
    opt = {k[4:]: v for k, v in named.items() if k.startswith("opt/")}
    return weights, opt
