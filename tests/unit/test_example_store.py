"""Unit tests of the device's Example Store: round trip, records of any schema, size cap,
expiry, persistence, use from several threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedfleet.device.example_store import ExampleStore

pytestmark = pytest.mark.unit

DAY = 86400.0


def _batch(n: int, width: int = 4, start: int = 0) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Rows whose first feature equals their label, so order and pairing can be checked."""
    labels = np.arange(start, start + n, dtype=np.int64)
    x = np.random.default_rng(start).random((n, width)).astype(np.float32)
    x[:, 0] = labels
    return x, labels


def _fields(x: NDArray[Any], y: NDArray[Any]) -> dict[str, NDArray[Any]]:
    return {"x": x, "y": y}


def _xy(records: dict[str, NDArray[Any]]) -> tuple[NDArray[Any], NDArray[Any]]:
    return records["x"], records["y"]


def test_round_trip_is_exact_and_oldest_first() -> None:
    with ExampleStore() as store:
        x1, y1 = _batch(5, start=10)
        x0, y0 = _batch(3, start=0)
        assert store.add({"x": x1, "y": y1}, now=200.0) == 5
        assert store.add({"x": x0, "y": y0}, now=100.0) == 3  # added later but created earlier
        x, y = _xy(store.query(now=300.0))
        assert x.dtype == np.float32
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x, np.concatenate([x0, x1]))
        np.testing.assert_array_equal(y, np.concatenate([y0, y1]))
        assert store.count(now=300.0) == 8


def test_query_limit_returns_the_oldest() -> None:
    with ExampleStore() as store:
        store.add(_fields(*_batch(10)), now=1.0)
        x, y = _xy(store.query(now=2.0, limit=4))
        np.testing.assert_array_equal(y, np.arange(4))
        assert x.shape == (4, 4)
        assert store.query(now=2.0, limit=0)["x"].shape == (0, 4)


def test_empty_store_queries_empty_arrays() -> None:
    with ExampleStore() as store:
        assert store.count(now=0.0) == 0
        assert store.query(now=0.0) == {}
        assert store.add(_fields(np.zeros((0, 3), np.float32), np.zeros(0, np.int64)), 0.0) == 0


def test_features_convert_from_other_dtypes() -> None:
    with ExampleStore() as store:
        x = np.array([[0.5, 1.25], [2.0, -3.5]], dtype=np.float64)
        store.add(_fields(np.zeros((1, 2), np.float32), np.zeros(1, np.int64)), now=0.0)
        store.add(_fields(x, np.array([1, 2], dtype=np.int32)), now=0.0)
        got_x, got_y = _xy(store.query(now=0.0))
        np.testing.assert_array_equal(got_x[1:], x.astype(np.float32))
        np.testing.assert_array_equal(got_y, [0, 1, 2])
        assert got_y.dtype == np.int64


def test_cap_evicts_oldest_across_batches() -> None:
    with ExampleStore(max_examples=10) as store:
        store.add(_fields(*_batch(6, start=0)), now=1.0)
        store.add(_fields(*_batch(6, start=100)), now=2.0)
        assert store.count(now=3.0) == 10
        _, y = _xy(store.query(now=3.0))
        np.testing.assert_array_equal(y, [2, 3, 4, 5, 100, 101, 102, 103, 104, 105])


def test_cap_evicts_by_creation_time_not_insertion_order() -> None:
    with ExampleStore(max_examples=4) as store:
        store.add(_fields(*_batch(2, start=50)), now=50.0)
        store.add(_fields(*_batch(2, start=10)), now=10.0)  # older, so evicted first
        store.add(_fields(*_batch(2, start=60)), now=60.0)
        np.testing.assert_array_equal(store.query(now=60.0)["y"], [50, 51, 60, 61])


def test_batch_larger_than_cap_keeps_its_newest_rows() -> None:
    with ExampleStore(max_examples=3) as store:
        store.add(_fields(*_batch(2, start=0)), now=1.0)
        assert store.add(_fields(*_batch(5, start=100)), now=2.0) == 3
        np.testing.assert_array_equal(store.query(now=2.0)["y"], [102, 103, 104])


def test_query_and_count_exclude_expired_before_expire_runs() -> None:
    with ExampleStore(ttl_seconds=DAY) as store:
        store.add(_fields(*_batch(3, start=0)), now=0.0)
        store.add(_fields(*_batch(2, start=10)), now=0.5 * DAY)
        assert store.count(now=DAY) == 5  # exactly ttl old: still usable
        assert store.count(now=DAY + 1) == 2
        np.testing.assert_array_equal(store.query(now=DAY + 1)["y"], [10, 11])
        assert store.count(now=2 * DAY) == 0
        assert store.query(now=2 * DAY)["y"].size == 0


def test_expire_deletes_and_counts_old_rows() -> None:
    with ExampleStore(ttl_seconds=DAY) as store:
        store.add(_fields(*_batch(3, start=0)), now=0.0)
        store.add(_fields(*_batch(2, start=10)), now=0.5 * DAY)
        assert store.expire(now=DAY + 1) == 3
        assert store.expire(now=DAY + 1) == 0
        np.testing.assert_array_equal(store.query(now=DAY + 1)["y"], [10, 11])
        # deleted, not just hidden: a query "in the past" no longer sees them
        np.testing.assert_array_equal(store.query(now=0.0)["y"], [10, 11])
        assert store.expire(now=10 * DAY) == 2
        assert store.count(now=0.0) == 0


def test_width_mismatch_is_refused() -> None:
    with ExampleStore() as store:
        store.add(_fields(*_batch(2, width=4)), now=0.0)
        with pytest.raises(ValueError, match=r"\(5,\).*\(4,\)"):
            store.add(_fields(*_batch(2, width=5)), now=1.0)
        assert store.count(now=1.0) == 2


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"x": np.zeros(4, np.float32), "y": np.zeros(1, np.int64)}, "equal length"),
        ({"x": np.zeros((2, 4), np.float32), "y": np.zeros(3, np.int64)}, "equal length"),
        ({"x": np.array([["a"], ["b"]]), "y": np.zeros(2, np.int64)}, "only numbers"),
        ({}, "at least one field"),
    ],
)
def test_malformed_batches_are_refused(fields: dict[str, NDArray[Any]], match: str) -> None:
    with ExampleStore() as store, pytest.raises(ValueError, match=match):
        store.add(fields, now=0.0)
    assert store.schema == {}


def test_records_of_any_schema_round_trip() -> None:
    rng = np.random.default_rng(3)
    batch = {
        "image": rng.random((5, 2, 3, 3)).astype(np.float32),
        "tokens": rng.integers(0, 1000, (5, 7)).astype(np.int32),
        "mask": rng.random((5, 7)) > 0.5,
        "target": rng.random(5),
    }
    with ExampleStore() as store:
        store.add(batch, now=0.0)
        got = store.query(now=1.0)
        assert list(got) == list(batch)
        for name, want in batch.items():
            assert got[name].dtype == want.dtype
            np.testing.assert_array_equal(got[name], want)
        assert store.schema["image"] == ((2, 3, 3), np.dtype(np.float32))
        # a batch of another schema is refused, naming the field and the shapes
        bad = {**batch, "image": np.zeros((1, 3, 3, 3), np.float32)}
        bad = {k: v[:1] for k, v in bad.items()}
        with pytest.raises(ValueError, match=r"'image'.*\(3, 3, 3\).*\(2, 3, 3\)"):
            store.add(bad, now=1.0)
        with pytest.raises(ValueError, match="differ"):
            store.add({"image": batch["image"]}, now=1.0)
        with pytest.raises(ValueError, match="dtype"):
            store.add({**batch, "target": batch["target"].astype(np.complex64)}, now=1.0)
        assert store.count(now=1.0) == 5


def test_safe_from_several_threads() -> None:
    with ExampleStore(max_examples=500) as store:
        errors: list[BaseException] = []

        def writer(k: int) -> None:
            try:
                for i in range(20):
                    store.add(_fields(*_batch(5, start=1000 * k + 5 * i)), now=float(i))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def reader() -> None:
            try:
                for _ in range(40):
                    x, y = _xy(store.query(now=100.0))
                    assert len(x) == len(y) <= 500
                    np.testing.assert_array_equal(x[:, 0], y)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
        threads += [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert store.count(now=100.0) == 300


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_examples"):
        ExampleStore(max_examples=0)
    with pytest.raises(ValueError, match="ttl_seconds"):
        ExampleStore(ttl_seconds=0)
    with ExampleStore() as store, pytest.raises(ValueError, match="limit"):
        store.query(now=0.0, limit=-1)


def test_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "examples.sqlite"
    x, y = _batch(7, width=3)
    with ExampleStore(path, max_examples=8) as store:
        store.add({"x": x, "y": y}, now=5.0)
    with ExampleStore(path, max_examples=8) as store:
        got_x, got_y = _xy(store.query(now=6.0))
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
        # the width is remembered from the stored rows
        with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
            store.add(_fields(*_batch(1, width=4)), now=7.0)
        # and the cap still counts the rows from before the reopen
        store.add(_fields(*_batch(2, width=3, start=100)), now=7.0)
        np.testing.assert_array_equal(store.query(now=7.0)["y"], [1, 2, 3, 4, 5, 6, 100, 101])


def test_close_releases_the_database() -> None:
    store = ExampleStore()
    store.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        store.count(now=0.0)


def test_bulk_round_trip_of_mnist_sized_rows_at_the_cap() -> None:
    x = np.random.default_rng(0).random((10_000, 784)).astype(np.float32)
    y = np.zeros(10_000, dtype=np.int64)
    with ExampleStore(max_examples=10_000) as store:
        assert store.add({"x": x, "y": y}, now=0.0) == 10_000
        got_x, _ = _xy(store.query(now=0.0))
        np.testing.assert_array_equal(got_x, x)


def test_a_store_opened_before_the_first_add_elsewhere_uses_its_schema(tmp_path: Path) -> None:
    """The device process opens the store empty; the app's process adds the first examples."""
    path = tmp_path / "examples.sqlite"
    reader, writer = ExampleStore(path), ExampleStore(path)
    with ExampleStore(path) as app:
        x, y = _batch(3)
        app.add(_fields(x, y), now=10.0)
    np.testing.assert_array_equal(reader.query(now=11.0)["y"], y)
    x2, y2 = _batch(2, start=3)
    assert writer.add(_fields(x2, y2), now=12.0) == 2  # the app's schema, not defined again
    assert writer.count(now=12.0) == reader.count(now=12.0) == 5
    reader.close()
    writer.close()
