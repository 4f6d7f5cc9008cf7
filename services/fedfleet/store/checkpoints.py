"""Read-through cache of decoded checkpoints, keyed by model version.

Selectors hand the same checkpoint to every device of a round and aggregators need it once per
commit: one store read and one decode per version, not per device.
"""

from __future__ import annotations

import threading

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.checkpoint import unpack_checkpoint
from fedfleet.core.models import Weights, shapes_of
from fedfleet.core.serde import encode_arrays
from fedfleet.core.spec import FLJob
from fedfleet.store.base import Store
from fedfleet.store.history.keeper import checkpoint_bytes

__all__ = ["CheckpointCache"]


class CheckpointCache:
    def __init__(self, store: Store, job: FLJob, initial: Weights) -> None:
        """``initial`` is the task's version 0, which is never stored."""
        self._store = store
        self._job = job
        self._initial = initial
        self._shapes = shapes_of(initial)
        self._version = -1
        self._weights: Weights = []
        self._opt: dict[str, NDArray[np.generic]] = {}
        self._raw = b""
        self._encoded = b""
        self._encoded_version = -1
        self._lock = threading.RLock()

    def load(self, version: int) -> tuple[Weights, dict[str, NDArray[np.generic]]]:
        """Weights and optimizer state at ``version`` (ValueError if the store has moved on)."""
        with self._lock:
            return self._load(version)

    def _load(self, version: int) -> tuple[Weights, dict[str, NDArray[np.generic]]]:
        if version != self._version:
            if version == 0:
                self._weights, self._opt = list(self._initial), {}
                self._raw = b""
            else:
                cp = self._store.checkpoint(self._job.key)
                if cp is None or cp.version != version:
                    have = cp.version if cp else 0
                    raise ValueError(
                        f"checkpoint version {version} not available (store has {have})"
                    )
                data = checkpoint_bytes(self._store, cp)
                self._weights, self._opt = unpack_checkpoint(data, self._shapes)
                self._raw = data
            self._version = version
        return self._weights, self._opt

    def weights(self, version: int) -> Weights:
        return self.load(version)[0]

    def encoded(self, version: int) -> bytes:
        """The model alone at ``version`` as a serde array message (what devices download)."""
        with self._lock:
            if self._encoded_version != version:
                weights = self.load(version)[0]
                self._encoded = encode_arrays(weights)
                self._encoded_version = version
            return self._encoded
