"""Streaming weighted aggregation of device updates (the Aggregator's job in Bonawitz et al.).

An aggregator must fold in each report as it arrives and forget it: holding every update of a
round would cost memory proportional to the goal count, and Bonawitz et al. size aggregators by
devices served. :class:`StreamingSum` keeps only float64 running sums (O(model) memory however
many updates it absorbed), merges with other partial sums (aggregators to the master
aggregator), and travels through :mod:`fedfleet.core.serde`. Every update is checked before it
touches the sum, so a rejected update leaves the sum exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from fedfleet.core.dp import add_gaussian_noise
from fedfleet.core.models import Weights
from fedfleet.core.serde import SerdeError, decode_arrays, encode_arrays

__all__ = [
    "REASON_COUNT",
    "REASON_DTYPE",
    "REASON_MALFORMED",
    "REASON_NON_FINITE",
    "REASON_SHAPE",
    "REASON_TOO_LARGE",
    "REASON_WEIGHT",
    "StreamingSum",
    "UpdateRejected",
    "decode_update",
    "validate_update",
    "weighted_mean",
]

REASON_COUNT = "count"
"""The update holds a different number of arrays than the model."""
REASON_SHAPE = "shape"
"""An array's shape differs from the model's."""
REASON_DTYPE = "dtype"
"""An array is not of the expected dtype (float32 for device updates)."""
REASON_NON_FINITE = "non_finite"
"""An array holds NaN or infinity."""
REASON_TOO_LARGE = "too_large"
"""The encoded update exceeds ``aggregation.maxUpdateBytes``; it was not parsed."""
REASON_WEIGHT = "weight"
"""The update's weight (example count) is not a finite positive number."""
REASON_MALFORMED = "malformed"
"""The bytes are not a well-formed array message."""

# Elements per multiply-then-add pass in StreamingSum.add: 512 KiB of float64 scratch stays in
# cache, so large arrays are read once instead of round-tripping a model-sized temporary.
_CHUNK = 65536


class UpdateRejected(ValueError):
    """An update (or partial sum) that must not be aggregated; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validate_update(
    update: Sequence[NDArray[Any]],
    shapes: Sequence[tuple[int, ...]],
    *,
    dtype: DTypeLike = np.float32,
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches ``shapes`` and ``dtype`` and is
    finite. Cheap checks (count, shape, dtype) run on every array before the finiteness pass."""
    if len(update) != len(shapes):
        raise UpdateRejected(
            REASON_COUNT, f"update holds {len(update)} arrays, model has {len(shapes)}"
        )
    want = np.dtype(dtype)
    for i, (arr, shape) in enumerate(zip(update, shapes, strict=True)):
        if not isinstance(arr, np.ndarray) or arr.dtype != want:
            got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise UpdateRejected(REASON_DTYPE, f"array {i} is {got}, expected {want}")
        if arr.shape != tuple(shape):
            raise UpdateRejected(
                REASON_SHAPE, f"array {i} has shape {arr.shape}, expected {tuple(shape)}"
            )
    for i, arr in enumerate(update):
        if not np.isfinite(arr).all():
            raise UpdateRejected(REASON_NON_FINITE, f"array {i} holds NaN or infinity")


def _check_weight(weight: float) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise UpdateRejected(REASON_WEIGHT, f"weight {weight!r} is not a number") from None
    if not (math.isfinite(w) and w > 0):
        raise UpdateRejected(REASON_WEIGHT, f"weight must be finite and positive, got {w}")
    return w


def decode_update(
    data: bytes | bytearray | memoryview,
    shapes: Sequence[tuple[int, ...]],
    *,
    max_bytes: int,
) -> Weights:
    """Parse and validate a device's encoded update, raising :class:`UpdateRejected`.

    The size limit is enforced before a single byte is parsed.
    """
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise UpdateRejected(
            REASON_TOO_LARGE, f"update of {size} bytes exceeds the limit of {max_bytes}"
        )
    try:
        arrays = decode_arrays(data, max_bytes=max_bytes)
    except SerdeError as exc:
        raise UpdateRejected(REASON_MALFORMED, str(exc)) from exc
    validate_update(arrays, shapes)
    return arrays


class StreamingSum:
    """Running weighted sums ``sum_k w_k * u_k`` and ``sum_k w_k`` in float64.

    Memory is the model's size in float64 plus a fixed scratch buffer, whatever the number of
    updates added. Not thread-safe: one aggregator task owns one sum.
    """

    __slots__ = ("_count", "_scratch", "_shapes", "_small", "_sums", "_total_weight")

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self._shapes = [tuple(int(d) for d in shape) for shape in shapes]
        self._sums = [np.zeros(shape, dtype=np.float64) for shape in self._shapes]
        largest = max((math.prod(shape) for shape in self._shapes), default=0)
        self._scratch = np.empty(min(largest, _CHUNK), dtype=np.float64)
        # Arrays that fit the scratch buffer get a view of it in their own shape, built once:
        # small models then pay two ufunc calls per array and no per-call reshaping.
        self._small = [
            self._scratch[: math.prod(shape)].reshape(shape) if math.prod(shape) <= _CHUNK else None
            for shape in self._shapes
        ]
        self._count = 0
        self._total_weight = 0.0

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return list(self._shapes)

    @property
    def count(self) -> int:
        """Number of updates folded in (including those inside merged partial sums)."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights of the updates folded in."""
        return self._total_weight

    @property
    def sums(self) -> list[NDArray[np.float64]]:
        """Read-only views of the float64 weighted sums (for noise or secure-sum layers)."""
        views = []
        for acc in self._sums:
            view = acc.view()
            view.flags.writeable = False
            views.append(view)
        return views

    def add(
        self, update: Sequence[NDArray[np.float32]], weight: float, *, validated: bool = False
    ) -> None:
        """Fold in ``weight * update``; on :class:`UpdateRejected` the sum is unchanged.

        ``validated=True`` skips :func:`validate_update` for a caller that has just run it on
        this very update (the aggregator validates before it claims a report slot).
        """
        w = _check_weight(weight)
        if not validated:
            validate_update(update, self._shapes)
        for acc, arr, scratch in zip(self._sums, update, self._small, strict=True):
            if scratch is None:
                self._accumulate(acc.reshape(-1), arr.reshape(-1), w)
            else:
                # dtype=float64: the product is formed in float64, not rounded to float32 first.
                np.multiply(arr, w, out=scratch, dtype=np.float64)
                np.add(acc, scratch, out=acc)
        self._count += 1
        self._total_weight += w

    def _accumulate(self, acc: NDArray[np.float64], x: NDArray[np.float32], w: float) -> None:
        n = acc.shape[0]
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            scratch = self._scratch[: stop - start]
            np.multiply(x[start:stop], w, out=scratch, dtype=np.float64)
            np.add(acc[start:stop], scratch, out=acc[start:stop])

    def merge(self, other: StreamingSum) -> None:
        """Fold in another partial sum of the same model."""
        if other._shapes != self._shapes:
            raise UpdateRejected(REASON_SHAPE, "cannot merge sums of differently shaped models")
        for acc, theirs in zip(self._sums, other._sums, strict=True):
            np.add(acc, theirs, out=acc)
        self._count += other._count
        self._total_weight += other._total_weight

    @classmethod
    def from_sums(
        cls,
        shapes: Sequence[tuple[int, ...]],
        sums: Sequence[NDArray[np.float64]],
        *,
        count: int,
        total_weight: float,
    ) -> StreamingSum:
        """A partial sum computed elsewhere (a secure-aggregation group's unmasked total)."""
        result = cls(shapes)
        if [tuple(a.shape) for a in sums] != result._shapes:
            raise UpdateRejected(REASON_SHAPE, "sums do not match the model's shapes")
        if any(a.dtype != np.float64 for a in sums):
            raise UpdateRejected(REASON_DTYPE, "sums must be float64")
        if any(not np.isfinite(a).all() for a in sums):
            raise UpdateRejected(REASON_NON_FINITE, "sums hold NaN or infinity")
        if (
            count < 0
            or not math.isfinite(total_weight)
            or total_weight < 0
            or (count == 0) != (total_weight == 0)
        ):
            raise UpdateRejected(
                REASON_WEIGHT, f"inconsistent count {count} / weight {total_weight}"
            )
        result._sums = [np.array(a, dtype=np.float64) for a in sums]
        result._count = count
        result._total_weight = float(total_weight)
        return result

    def add_noise(self, stddev: float, rng: np.random.Generator) -> None:
        """Add independent N(0, stddev^2) noise to every coordinate of the sums (DP-FedAvg's
        Gaussian mechanism, applied by the master to the merged sum)."""
        add_gaussian_noise(self._sums, stddev, rng)

    def mean(self, denominator: float | None = None) -> Weights:
        """The weighted mean as float32 arrays; ``ValueError`` when nothing was added.

        ``denominator`` replaces the realised total weight by a fixed one (DP-FedAvg divides
        the noisy sum by a constant, so the average reveals nothing beyond the noisy sum)."""
        if self._count == 0:
            raise ValueError("no updates to average")
        total = self._total_weight if denominator is None else float(denominator)
        if not (math.isfinite(total) and total > 0):
            raise ValueError(f"denominator must be finite and positive, got {total}")
        return [
            np.divide(acc, total, out=np.empty(acc.shape, dtype=np.float32), casting="same_kind")
            for acc in self._sums
        ]

    def to_bytes(self) -> bytes:
        """Encode the sums, count and total weight (a serde array message)."""
        extra = [np.array(self._count, dtype=np.int64), np.array(self._total_weight)]
        return encode_arrays([*self._sums, *extra])

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        shapes: Sequence[tuple[int, ...]],
        *,
        max_bytes: int | None = None,
    ) -> StreamingSum:
        """Decode :meth:`to_bytes` output for a model of ``shapes``, raising
        :class:`UpdateRejected` if it is malformed, mis-shaped or not finite."""
        result = cls(shapes)
        try:
            arrays = decode_arrays(
                data, max_bytes=max_bytes, expected_shapes=[*result._shapes, (), ()]
            )
        except SerdeError as exc:
            raise UpdateRejected(REASON_MALFORMED, str(exc)) from exc
        *sums, count_arr, total_arr = arrays
        if count_arr.dtype != np.int64 or total_arr.dtype != np.float64:
            raise UpdateRejected(REASON_DTYPE, "count must be int64 and total weight float64")
        for i, acc in enumerate(sums):
            if acc.dtype != np.float64:
                raise UpdateRejected(REASON_DTYPE, f"sum {i} is {acc.dtype}, expected float64")
            if not np.isfinite(acc).all():
                raise UpdateRejected(REASON_NON_FINITE, f"sum {i} holds NaN or infinity")
        count = int(count_arr)
        total = float(total_arr)
        if count < 0 or not math.isfinite(total) or total < 0 or (count == 0) != (total == 0):
            raise UpdateRejected(REASON_WEIGHT, f"inconsistent count {count} / weight {total}")
        result._sums = sums
        result._count = count
        result._total_weight = total
        return result


def weighted_mean(
    updates: Sequence[Sequence[NDArray[np.float32]]], weights: Sequence[float]
) -> Weights:
    """Batch reference for :class:`StreamingSum`: ``sum_k w_k u_k / sum_k w_k`` per array.

    Holds every update at once (O(K x model) memory); meant for tests and small rounds.
    """
    if not updates:
        raise ValueError("no updates to average")
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = np.array([_check_weight(x) for x in weights], dtype=np.float64)
    shapes = [arr.shape for arr in updates[0]]
    for update in updates:
        validate_update(update, shapes)
    total = w.sum()
    out: Weights = []
    for i in range(len(shapes)):
        stacked = np.stack([update[i] for update in updates]).astype(np.float64)
        out.append((np.tensordot(w, stacked, axes=1) / total).astype(np.float32))
    return out
