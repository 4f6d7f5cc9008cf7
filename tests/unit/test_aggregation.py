"""Unit tests of fedfleet.core.aggregation: streaming sums, validation, partial-sum shipping."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from collections.abc import Sequence

import numpy as np
import pytest

from fedfleet.core.aggregation import (
    StreamingSum,
    UpdateRejected,
    decode_update,
    validate_update,
    weighted_mean,
)
from fedfleet.core.serde import encode_arrays

pytestmark = pytest.mark.unit

SHAPES: list[tuple[int, ...]] = [(6, 4), (4,), (), (0, 3)]


def _update(
    rng: np.random.Generator, shapes: Sequence[tuple[int, ...]] = SHAPES
) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _reference(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """An independent float64 weighted mean, one array at a time."""
    w = np.asarray(weights, dtype=np.float64)
    return [
        np.einsum("k,k...->...", w, np.array([u[i] for u in updates], dtype=np.float64)) / w.sum()
        for i in range(len(updates[0]))
    ]


def test_streaming_matches_batch_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        shapes = [tuple(int(d) for d in rng.integers(0, 6, size=rng.integers(0, 3)))]
        shapes += [(int(rng.integers(1, 50)),)]
        k = int(rng.integers(1, 25))
        updates = [_update(rng, shapes) for _ in range(k)]
        weights = [float(w) for w in rng.uniform(0.5, 500.0, size=k)]
        stream = StreamingSum(shapes)
        for u, w in zip(updates, weights, strict=True):
            stream.add(u, w)
        assert stream.count == k
        assert stream.total_weight == pytest.approx(sum(weights), rel=1e-12)
        reference = _reference(updates, weights)
        for s, ref in zip(stream.sums, reference, strict=True):
            np.testing.assert_allclose(s / stream.total_weight, ref, rtol=0, atol=1e-9)
        for m, b in zip(stream.mean(), weighted_mean(updates, weights), strict=True):
            assert m.dtype == np.float32 and b.dtype == np.float32
            np.testing.assert_allclose(m, b, rtol=0, atol=1e-9)


def test_large_arrays_take_the_chunked_path() -> None:
    rng = np.random.default_rng(1)
    shapes = [(70_001,), (3,)]
    updates = [_update(rng, shapes) for _ in range(3)]
    stream = StreamingSum(shapes)
    for u, w in zip(updates, [1.0, 2.0, 3.0], strict=True):
        stream.add(u, w)
    ref = _reference(updates, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(stream.sums[0] / 6.0, ref[0], rtol=0, atol=1e-12)


def test_merge_of_partial_sums_equals_one_stream() -> None:
    rng = np.random.default_rng(2)
    updates = [_update(rng) for _ in range(20)]
    weights = [float(w) for w in rng.integers(1, 100, size=20)]
    whole = StreamingSum(SHAPES)
    parts = [StreamingSum(SHAPES) for _ in range(3)]
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        whole.add(u, w)
        parts[i % 3].add(u, w)
    master = StreamingSum(SHAPES)
    for part in parts:
        master.merge(part)
    assert master.count == whole.count == 20
    assert master.total_weight == whole.total_weight
    for a, b in zip(master.sums, whole.sums, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(UpdateRejected) as info:
        master.merge(StreamingSum([(2,)]))
    assert info.value.reason == "shape"


def test_to_bytes_round_trip() -> None:
    rng = np.random.default_rng(3)
    stream = StreamingSum(SHAPES)
    for _ in range(5):
        stream.add(_update(rng), float(rng.uniform(1, 10)))
    back = StreamingSum.from_bytes(stream.to_bytes(), SHAPES)
    assert back.count == stream.count and back.total_weight == stream.total_weight
    for a, b in zip(back.sums, stream.sums, strict=True):
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, b)
    back.add(_update(rng), 1.0)  # the decoded sums are writable, owned arrays
    assert back.count == 6
    empty = StreamingSum.from_bytes(StreamingSum(SHAPES).to_bytes(), SHAPES)
    assert empty.count == 0


def test_from_bytes_refuses_bad_partial_sums() -> None:
    stream = StreamingSum(SHAPES)
    stream.add(_update(np.random.default_rng(0)), 2.0)
    data = stream.to_bytes()
    cases = {
        "malformed": data[:-1],
        "shape": None,
        "non_finite": encode_arrays(
            [np.full(s, np.nan) for s in SHAPES] + [np.array(1), np.array(2.0)]
        ),
        "weight": encode_arrays([np.zeros(s) for s in SHAPES] + [np.array(0), np.array(2.0)]),
        "dtype": encode_arrays(
            [np.zeros(s, np.float32) for s in SHAPES] + [np.array(1), np.array(2.0)]
        ),
    }
    for reason, payload in cases.items():
        with pytest.raises(UpdateRejected) as info:
            if payload is None:
                StreamingSum.from_bytes(data, [(4, 6), (4,), (), (0, 3)])
            else:
                StreamingSum.from_bytes(payload, SHAPES)
        expected = "malformed" if reason == "shape" else reason
        assert info.value.reason == expected, reason
    with pytest.raises(UpdateRejected, match="exceeds the limit"):
        StreamingSum.from_bytes(data, SHAPES, max_bytes=len(data) - 1)


def test_rejected_updates_leave_the_sum_unchanged() -> None:
    rng = np.random.default_rng(4)
    stream = StreamingSum(SHAPES)
    stream.add(_update(rng), 3.0)
    before = stream.to_bytes()

    def with_bad_last_array(value: float) -> list[np.ndarray]:
        update = _update(rng)
        update[1][2] = value  # earlier arrays are valid: nothing may be added before the check
        return update

    bad = {
        "non_finite": [
            (with_bad_last_array(np.nan), 1.0),
            (with_bad_last_array(np.inf), 1.0),
            (with_bad_last_array(-np.inf), 1.0),
        ],
        "shape": [(_update(rng, [(4, 6), (4,), (), (0, 3)]), 1.0)],
        "dtype": [([a.astype(np.float64) for a in _update(rng)], 1.0)],
        "count": [(_update(rng)[:2], 1.0)],
        "weight": [(_update(rng), w) for w in (0.0, -1.0, float("nan"), float("inf"))],
    }
    for reason, cases in bad.items():
        for update, weight in cases:
            with pytest.raises(UpdateRejected) as info:
                stream.add(update, weight)
            assert info.value.reason == reason
            assert isinstance(info.value, ValueError)
            assert stream.to_bytes() == before


def test_memory_stays_o_model() -> None:
    shapes = [(200, 50), (50,)]
    model_bytes = sum(int(np.prod(s)) * 4 for s in shapes)
    stream = StreamingSum(shapes)
    rng = np.random.default_rng(5)
    first = _update(rng, shapes)
    stream.add(first, 1.0)
    ref = weakref.ref(first[0])
    del first
    gc.collect()
    assert ref() is None  # the sum keeps no reference to the updates it absorbed
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for _ in range(100):
            stream.add(_update(rng, shapes), 2.0)
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stream.count == 101
    assert current - baseline < model_bytes // 4


def test_validate_update_and_decode_update() -> None:
    rng = np.random.default_rng(6)
    update = _update(rng)
    validate_update(update, SHAPES)
    data = encode_arrays(update)
    decoded = decode_update(data, SHAPES, max_bytes=len(data))
    for a, b in zip(decoded, update, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UpdateRejected) as info:
        decode_update(data, SHAPES, max_bytes=len(data) - 1)
    assert info.value.reason == "too_large"
    with pytest.raises(UpdateRejected) as info:
        decode_update(b"FFA1junk", SHAPES, max_bytes=1024)
    assert info.value.reason == "malformed"
    with pytest.raises(UpdateRejected) as info:
        decode_update(encode_arrays(update[::-1]), SHAPES, max_bytes=1024)
    assert info.value.reason in {"shape", "dtype"}
    with pytest.raises(UpdateRejected) as info:
        validate_update([[1.0, 2.0]], [(2,)])  # type: ignore[list-item]
    assert info.value.reason == "dtype"


def test_empty_sum_and_empty_batch_refuse_to_average() -> None:
    with pytest.raises(ValueError, match="no updates"):
        StreamingSum(SHAPES).mean()
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([], [])
    with pytest.raises(UpdateRejected):
        weighted_mean([_update(np.random.default_rng(0))], [0.0])
