"""Aggregator throughput: MB/s of float32 updates validated and folded in, against bare numpy.

For each model size (the 784-200-10 MLP's 159,010 parameters, 1M and 4M) the benchmark
pre-generates ``K`` encoded updates exactly as a device sends them
(``fedfleet.core.serde.encode_arrays`` of the weight list), then times, over the same K
updates in the same run:

- **fedfleet**: the Aggregator's real per-report path (``services/fedfleet/aggregator/actor.py``
  ``Aggregator.accept`` minus the ticket, phase and store checks): the size check,
  ``decode_arrays(..., max_bytes=..., expected_shapes=..., copy=False)`` (parse every header;
  aligned zero-copy views), ``validate_update`` (count, shape, dtype, finiteness) and
  ``StreamingSum.add(..., validated=True)`` (float64 multiply-then-add, chunked);
- **numpy**: ``acc += w * x`` per array, with ``acc`` float64 like the StreamingSum's and ``x``
  the same updates decoded ahead of time (aligned float32 arrays: the bare arithmetic with no
  parsing, copy or checks; ``w * x`` is formed in float32).

Throughput is bytes of float32 update data (parameters x 4) per second, best of ``--repeats``
passes over the K updates (the median is printed too); the ratio fedfleet / numpy has a target
of >= 0.5. This is a report, not a test: it exits 0 whatever the figures.

    python bench/aggregator.py [--repeats N] [--updates-mb MB]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.aggregation import StreamingSum, validate_update
from fedfleet.core.serde import decode_arrays, encode_arrays
from fedfleet.core.spec import ModelKind, ModelSpec
from fedfleet.tasks.builtin import weight_shapes as _shapes

TARGET_RATIO = 0.5
MAX_UPDATE_BYTES = 64 * 1024 * 1024
"""``aggregation.maxUpdateBytes``'s default, as the actor passes it to ``decode_arrays``."""

Shapes = list[tuple[int, ...]]


def model_sizes() -> list[tuple[str, Shapes]]:
    mlp = _shapes(ModelSpec(kind=ModelKind.mlp, inputs=784, classes=10, hidden=[200]))
    # Exact 1M and 4M: a dense layer plus its bias, so both paths handle two arrays per update.
    return [
        ("mlp 784-200-10", mlp),
        ("1M (1000x999+1000)", [(1000, 999), (1000,)]),
        ("4M (2000x1999+2000)", [(2000, 1999), (2000,)]),
    ]


def params(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def make_updates(
    shapes: Shapes, k: int, rng: np.random.Generator
) -> tuple[list[bytes], list[float]]:
    """K encoded updates (small deltas, like a device's local - global) and their weights."""
    messages = [
        encode_arrays(
            [(rng.standard_normal(s, dtype=np.float32) * np.float32(0.01)) for s in shapes]
        )
        for _ in range(k)
    ]
    weights = [float(n) for n in rng.integers(1, 60, size=k)]
    return messages, weights


def fedfleet_pass(
    shapes: Shapes, messages: Sequence[bytes], weights: Sequence[float]
) -> Callable[[], None]:
    """One round's worth of reports through the actor's per-report path (fresh sum each pass)."""

    def run() -> None:
        acc = StreamingSum(shapes)
        for data, w in zip(messages, weights, strict=True):
            if len(data) > MAX_UPDATE_BYTES:
                raise AssertionError("unreachable: updates are far below the limit")
            update = decode_arrays(
                data, max_bytes=MAX_UPDATE_BYTES, expected_shapes=shapes, copy=False
            )
            validate_update(update, shapes)
            acc.add(update, w, validated=True)

    return run


def numpy_pass(
    shapes: Shapes, decoded: Sequence[Sequence[NDArray[np.float32]]], weights: Sequence[float]
) -> Callable[[], None]:
    """The same updates, already decoded: ``acc += w * x`` into float64 accumulators."""

    def run() -> None:
        accs = [np.zeros(s, dtype=np.float64) for s in shapes]
        for update, w in zip(decoded, weights, strict=True):
            for acc, x in zip(accs, update, strict=True):
                acc += w * x

    return run


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Row:
    name: str
    params: int
    k: int
    fedfleet: list[float]
    numpy: list[float]

    @property
    def data_mb(self) -> float:
        return self.params * 4 * self.k / 1e6

    def mbps(self, seconds: float) -> float:
        return self.data_mb / seconds


def check_same_sum(shapes: Shapes, messages: Sequence[bytes], weights: Sequence[float]) -> float:
    """Largest |difference| between the two paths' weighted means (a sanity check)."""
    acc = StreamingSum(shapes)
    accs = [np.zeros(s, dtype=np.float64) for s in shapes]
    for data, w in zip(messages, weights, strict=True):
        update = decode_arrays(data, expected_shapes=shapes)
        acc.add(update, w)
        for a, x in zip(accs, update, strict=True):
            a += w * x
    total = sum(weights)
    return max(float(np.max(np.abs(m - a / total))) for m, a in zip(acc.mean(), accs, strict=True))


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per path (best of)")
    parser.add_argument(
        "--updates-mb",
        type=float,
        default=128.0,
        help="float32 update data per pass, MB (K = this / update size, at least 4)",
    )
    args = parser.parse_args()
    if args.repeats < 1 or args.updates_mb <= 0:
        parser.error("--repeats must be at least 1 and --updates-mb positive")

    print(f"fedfleet aggregator throughput, {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cores, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}"
    )
    print(f"load average at start: {load_average()}", flush=True)

    rng = np.random.default_rng(0)
    rows: list[Row] = []
    for name, shapes in model_sizes():
        p = params(shapes)
        k = max(4, round(args.updates_mb * 1e6 / (4 * p)))
        messages, weights = make_updates(shapes, k, rng)
        decoded: list[list[NDArray[Any]]] = [
            decode_arrays(m, expected_shapes=shapes) for m in messages
        ]
        diff = check_same_sum(shapes, messages, weights)
        print(f"==> {name}: {p:,} params, K={k} updates, |mean diff| {diff:.2e}", flush=True)
        # Interleave the two paths so a neighbour's burst of load hits both alike.
        ff: list[float] = []
        bare: list[float] = []
        run_ff = fedfleet_pass(shapes, messages, weights)
        run_np = numpy_pass(shapes, decoded, weights)
        run_ff()  # warm-up: first-touch page faults and allocator state are not steady state
        run_np()
        for _ in range(args.repeats):
            ff.append(timed(run_ff))
            bare.append(timed(run_np))
        rows.append(Row(name, p, k, ff, bare))
        del messages, decoded

    print()
    print(
        f"{'model':<22}{'params':>11}{'K':>5}{'fedfleet MB/s':>15}{'numpy MB/s':>12}"
        f"{'ratio':>8}  {'median ratio':>12}  verdict"
    )
    for r in rows:
        ff_best, np_best = min(r.fedfleet), min(r.numpy)
        ratio = np_best / ff_best
        med = statistics.median(r.numpy) / statistics.median(r.fedfleet)
        mark = "PASS" if ratio >= TARGET_RATIO else "MISS"
        print(
            f"{r.name:<22}{r.params:>11,}{r.k:>5}{r.mbps(ff_best):>15.0f}{r.mbps(np_best):>12.0f}"
            f"{ratio:>8.2f}  {med:>12.2f}  {mark} (target >= {TARGET_RATIO})"
        )
    print(
        "\nMB/s = float32 update bytes (params x 4 x K) / best pass time; "
        "ratio = fedfleet MB/s / numpy MB/s."
    )
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
