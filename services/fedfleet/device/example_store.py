"""The device's Example Store (Bonawitz et al. 2019, section 3).

On a phone the app, not the FL runtime, owns the training data: it writes examples into local
storage as the user produces them, bounded in size and age so the store cannot grow without end
or keep data past its retention period. The FL runtime only reads them, through a small query
API, when it runs a plan. This is that store, on SQLite.

An example is a record of named fields of any fixed shape and numeric dtype (features, an image,
a label, a target...): the task decides what they mean. The first batch written fixes the
store's schema (names, per-example shapes, dtypes; kept in the database), later batches must
match it (dtypes are cast when that is safe within their kind). A record is stored as the raw
little-endian bytes of its fields, back to back (no pickle), one row per example, in one table
indexed on ``created_at``; a query reads the rows back in one buffer viewed through a numpy
structured dtype. The clock is passed in as ``now`` (seconds) so behaviour is deterministic in
tests and in the fleet simulator, which runs on simulated time. An example is expired once it is
more than ``ttl_seconds`` old; expired examples are never returned, whether or not
:meth:`ExampleStore.expire` has deleted them yet. One store may be used from several threads
(the app's, and the runtime's training thread): every call holds the store's lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ExampleStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_created_at ON examples (created_at, id);
CREATE TABLE IF NOT EXISTS fields (
    position INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL
);
"""

_KINDS = "biuf"  # bool, signed, unsigned, float: what a record may hold


class ExampleStore:
    """Training examples written by the app, capped in number and age, read by the runtime.

    ``path`` is a SQLite file, or ``":memory:"`` for a store that lives as long as the object.
    ``max_examples`` caps the rows kept: adding beyond it evicts the oldest. ``ttl_seconds`` is
    how long an example may be used after it was added (a week by default).
    """

    def __init__(
        self,
        path: str | Path = ":memory:",
        *,
        max_examples: int = 10_000,
        ttl_seconds: float = 7 * 86400,
    ) -> None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be at least 1, got {max_examples}")
        if not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        self.max_examples = max_examples
        self.ttl_seconds = float(ttl_seconds)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False)
        with self._conn:
            self._conn.executescript(_SCHEMA)
        self._record: np.dtype[np.void] | None = self._stored_schema()

    def _stored_schema(self) -> np.dtype[np.void] | None:
        rows = self._conn.execute(
            "SELECT name, dtype, shape FROM fields ORDER BY position"
        ).fetchall()
        if not rows:
            return None
        return np.dtype([(name, np.dtype(dt), tuple(json.loads(sh))) for name, dt, sh in rows])

    @property
    def schema(self) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
        """Per field, the shape of one example and the dtype (empty until the first add)."""
        record = self._record
        if record is None or record.fields is None:
            return {}
        return {name: (record[name].shape, record[name].base) for name in record.names or ()}

    def _cutoff(self, now: float) -> float:
        # Rows created before the cutoff are expired; one expression keeps query, count and
        # expire in agreement at the boundary.
        return float(now) - self.ttl_seconds

    def _conform(self, fields: Mapping[str, ArrayLike]) -> tuple[dict[str, NDArray[Any]], int]:
        if not fields:
            raise ValueError("a record needs at least one field")
        arrays = {str(k): np.asarray(v) for k, v in fields.items()}
        lengths = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise ValueError(f"fields must be arrays of equal length (one per example): {lengths}")
        for name, a in arrays.items():
            if a.dtype.kind not in _KINDS:
                raise ValueError(f"field {name!r} has dtype {a.dtype}: only numbers are stored")
        n = next(iter(lengths.values()))
        assert n is not None
        return arrays, n

    def _record_for(self, arrays: dict[str, NDArray[Any]]) -> np.dtype[np.void]:
        record = self._record
        if record is None:
            return np.dtype(
                [(k, a.dtype.newbyteorder("<"), a.shape[1:]) for k, a in arrays.items()]
            )
        schema = self.schema
        if set(arrays) != set(schema):
            raise ValueError(f"fields {sorted(arrays)} differ from the store's {sorted(schema)}")
        for name, a in arrays.items():
            shape, dtype = schema[name]
            if a.shape[1:] != shape:
                raise ValueError(
                    f"field {name!r}: examples of shape {a.shape[1:]}, the store holds {shape}"
                )
            if not np.can_cast(a.dtype, dtype, casting="same_kind"):
                raise ValueError(f"field {name!r}: dtype {a.dtype}, the store holds {dtype}")
        return record

    def add(self, fields: Mapping[str, ArrayLike], now: float) -> int:
        """Store a batch of examples, created at ``now``: ``fields`` maps each field's name to
        an array whose first dimension counts the examples.

        Returns the number of rows written. If the store then holds more than ``max_examples``
        the oldest rows are evicted; rows of this batch that would be evicted at once (a batch
        larger than the cap) are not written at all, so the newest ``max_examples`` are kept.
        Raises ``ValueError`` if the batch does not match the store's schema.
        """
        arrays, n = self._conform(fields)
        with self._lock:
            if self._record is None:  # another process may have written the first batch
                self._record = self._stored_schema()
            record = self._record_for(arrays)
            if n == 0:
                return 0
            keep = slice(max(0, n - self.max_examples), None)
            rows = np.empty(len(range(n)[keep]), dtype=record)
            for name, a in arrays.items():
                rows[name] = a[keep]
            created = float(now)
            with self._conn:
                if self._record is None:
                    self._conn.executemany(
                        "INSERT INTO fields (position, name, dtype, shape) VALUES (?, ?, ?, ?)",
                        (
                            (i, name, record[name].base.str, json.dumps(record[name].shape))
                            for i, name in enumerate(record.names or ())
                        ),
                    )
                self._conn.executemany(
                    "INSERT INTO examples (created_at, record) VALUES (?, ?)",
                    ((created, row.tobytes()) for row in rows),
                )
                (total,) = self._conn.execute("SELECT count(*) FROM examples").fetchone()
                excess = int(total) - self.max_examples
                if excess > 0:
                    self._conn.execute(
                        "DELETE FROM examples WHERE id IN "
                        "(SELECT id FROM examples ORDER BY created_at, id LIMIT ?)",
                        (excess,),
                    )
            self._record = record
            return len(rows)

    def expire(self, now: float) -> int:
        """Delete examples older than ``ttl_seconds`` at ``now``; return how many were deleted."""
        with self._lock, self._conn:
            cur = self._conn.execute(
                "DELETE FROM examples WHERE created_at < ?", (self._cutoff(now),)
            )
        return cur.rowcount

    def count(self, now: float) -> int:
        """Number of unexpired examples at ``now``."""
        with self._lock:
            (n,) = self._conn.execute(
                "SELECT count(*) FROM examples WHERE created_at >= ?", (self._cutoff(now),)
            ).fetchone()
        return int(n)

    def query(self, now: float, *, limit: int | None = None) -> dict[str, NDArray[Any]]:
        """Unexpired examples at ``now``, oldest first, at most ``limit`` of them: each field
        as an array of shape ``(n, *field_shape)`` in the store's dtype (empty before the
        first add)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be non-negative, got {limit}")
        with self._lock:
            blobs = [
                blob
                for (blob,) in self._conn.execute(
                    "SELECT record FROM examples WHERE created_at >= ? "
                    "ORDER BY created_at, id LIMIT ?",
                    (self._cutoff(now), -1 if limit is None else limit),
                )
            ]
            if self._record is None:  # another process (the app) may have written the first
                self._record = self._stored_schema()
            record = self._record
        if record is None:
            return {}
        rows = np.frombuffer(b"".join(blobs), dtype=record)
        return {
            name: np.ascontiguousarray(rows[name], dtype=record[name].base.newbyteorder("="))
            for name in record.names or ()
        }

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
