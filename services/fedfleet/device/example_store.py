"""The device's Example Store (Bonawitz et al. 2019, section 3).

On a phone the app, not the FL runtime, owns the training data: it writes examples into local
storage as the user produces them, bounded in size and age so the store cannot grow without end
or keep data past its retention period. The FL runtime only reads them, through a small query
API, when it runs a plan. This is that store, on SQLite.

Features are stored as raw little-endian float32 bytes (no pickle), one row per example, in one
table indexed on ``created_at``. The clock is passed in as ``now`` (seconds) so behaviour is
deterministic in tests and in the fleet simulator, which runs on simulated time. An example is
expired once it is more than ``ttl_seconds`` old; expired examples are never returned, whether
or not :meth:`ExampleStore.expire` has deleted them yet.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
from numpy.typing import NDArray

__all__ = ["ExampleStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    label INTEGER NOT NULL,
    features BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_created_at ON examples (created_at, id);
"""

_FLOAT = np.dtype("<f4")


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
        self._conn = sqlite3.connect(str(path))
        with self._conn:
            self._conn.executescript(_SCHEMA)
        self._width: int | None = self._stored_width()

    def _stored_width(self) -> int | None:
        row = self._conn.execute("SELECT length(features) FROM examples LIMIT 1").fetchone()
        return None if row is None else int(row[0]) // _FLOAT.itemsize

    def _cutoff(self, now: float) -> float:
        # Rows created before the cutoff are expired; one expression keeps query, count and
        # expire in agreement at the boundary.
        return float(now) - self.ttl_seconds

    def add(self, x: NDArray[Any], y: NDArray[Any], now: float) -> int:
        """Store examples ``x`` (rows of features) with labels ``y``, created at ``now``.

        Returns the number of rows written. If the store then holds more than ``max_examples``
        the oldest rows are evicted; rows of this batch that would be evicted at once (a batch
        larger than the cap) are not written at all, so the newest ``max_examples`` are kept.
        Raises ``ValueError`` if the feature width differs from what the store already holds.
        """
        feats = np.asarray(x)
        labels = np.asarray(y)
        if feats.ndim != 2:
            raise ValueError(f"x must be 2-D (examples, features), got shape {feats.shape}")
        if labels.ndim != 1 or len(labels) != len(feats):
            raise ValueError(f"y must be 1-D with {len(feats)} labels, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        width = feats.shape[1]
        if self._width is not None and width != self._width:
            raise ValueError(f"feature width {width} differs from the store's {self._width}")
        if len(feats) == 0:
            return 0
        keep = slice(max(0, len(feats) - self.max_examples), None)
        rows = np.ascontiguousarray(feats[keep], dtype=_FLOAT)
        kept_labels = labels[keep].astype(np.int64)
        created = float(now)
        with self._conn:
            self._conn.executemany(
                "INSERT INTO examples (created_at, label, features) VALUES (?, ?, ?)",
                (
                    (created, int(label), row.tobytes())
                    for label, row in zip(kept_labels, rows, strict=True)
                ),
            )
            (total,) = self._conn.execute("SELECT count(*) FROM examples").fetchone()
            excess = int(total) - self.max_examples
            if excess > 0:
                self._conn.execute(
                    "DELETE FROM examples WHERE id IN "
                    "(SELECT id FROM examples ORDER BY created_at, id LIMIT ?)",
                    (excess,),
                )
        self._width = width
        return len(rows)

    def expire(self, now: float) -> int:
        """Delete examples older than ``ttl_seconds`` at ``now``; return how many were deleted."""
        with self._conn:
            cur = self._conn.execute(
                "DELETE FROM examples WHERE created_at < ?", (self._cutoff(now),)
            )
        return cur.rowcount

    def count(self, now: float) -> int:
        """Number of unexpired examples at ``now``."""
        (n,) = self._conn.execute(
            "SELECT count(*) FROM examples WHERE created_at >= ?", (self._cutoff(now),)
        ).fetchone()
        return int(n)

    def query(
        self, now: float, *, limit: int | None = None
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Unexpired examples at ``now``, oldest first, at most ``limit`` of them.

        Returns ``(x, y)``: float32 features of shape ``(n, width)`` and int64 labels.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be non-negative, got {limit}")
        cur = self._conn.execute(
            "SELECT label, features FROM examples WHERE created_at >= ? "
            "ORDER BY created_at, id LIMIT ?",
            (self._cutoff(now), -1 if limit is None else limit),
        )
        labels: list[int] = []
        blobs: list[bytes] = []
        for label, blob in cur:
            labels.append(label)
            blobs.append(blob)
        width = self._width or 0
        flat = np.frombuffer(b"".join(blobs), dtype=_FLOAT)
        x = flat.reshape(len(blobs), width).astype(np.float32)
        return x, np.array(labels, dtype=np.int64)

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
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
