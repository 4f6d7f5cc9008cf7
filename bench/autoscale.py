"""Folding time per round as updates grow 10x: a pool sized by load vs a fixed pool.

One round of ``--devices`` reports (default 130: goal 100 at 130% over-selection) is folded by
real :class:`~fedfleet.aggregator.actor.Aggregator` actors over the memory store — the whole
per-report path: ticket, phase, size, decode, validate, the exactly-once claim, the bounded
fold — with the reports dealt round-robin over the round's aggregators as selectors deal them.
Two models, the built-in MLP 784-25-10 (19,885 parameters) and 784-250-10 (198,760: 10x),
each folded by:

- **sized**: the pool :func:`fedfleet.core.autoscale.size_pool` gives for the round's devices,
  the model's update size and a round budget (``--round-seconds``), with the capacity of one
  aggregator measured first in the same run (bytes per second of fold time on the small model);
- **fixed**: the pool the small model was sized to, kept for the large one (what the operator
  did before: sized once, by devices).

Aggregators are separate pods, so a round's folding time is the busiest aggregator's total
(each aggregator's reports are folded one after another here and timed; the figure is the
maximum over the pool, as if each ran on its own core), best of ``--repeats`` rounds (the
median in brackets). This is a report, not a test: it
prints figures and exits 0.

BLAS runs on one thread (``OPENBLAS_NUM_THREADS=1`` unless set), as in an aggregator pod of
one core: on the shared 2-core development machine, OpenBLAS' threads made each update's norm
(one ``np.dot``) take about 8 ms instead of microseconds, and the capacity measured 11-63 MiB/s
instead of about 320.

    python bench/autoscale.py [--devices N] [--round-seconds S] [--repeats R]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads its BLAS

import argparse
import math
import platform
import statistics
import time
from typing import Any

import numpy as np

from fedfleet.aggregator.actor import Aggregator
from fedfleet.core.autoscale import PoolLoad, PoolPolicy, size_pool, update_bytes
from fedfleet.core.protocol import Phase, ReportEnvelope, RoundState, report_ticket
from fedfleet.core.serde import encode_arrays
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.store.memory import MemoryStore
from fedfleet.tasks import task_of

SECRET = b"b" * 32
HIDDEN = {"small": 25, "large (10x)": 250}


def _job(hidden: int, devices: int, capacity: float) -> FLJob:
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": f"bench-{hidden}"},
            "spec": {
                "population": "bench",
                "model": {"kind": "mlp", "inputs": 784, "classes": 10, "hidden": [hidden]},
                "rounds": {"goalCount": devices, "overSelection": 1.0},
                "fleet": {"devices": devices},
                "actors": {
                    "devicesPerAggregator": 100_000,  # the bytes decide here
                    "maxAggregators": 64,
                    "aggregatorBytesPerSecond": max(1024, int(capacity)),
                },
            },
        }
    )


def _updates(job: FLJob, devices: int, rng: np.random.Generator) -> list[bytes]:
    shapes = task_of(job).shapes
    return [
        encode_arrays([rng.normal(0, 0.01, s).astype(np.float32) for s in shapes])
        for _ in range(devices)
    ]


def fold_round(job: FLJob, updates: list[bytes], pool: int) -> list[float]:
    """Fold one round over ``pool`` fresh aggregators; each aggregator's busy seconds."""
    store = MemoryStore()
    token = store.acquire_lease(job.key, "bench", 600)
    assert token is not None
    names = tuple(f"agg-{i}" for i in range(pool))
    state = RoundState(
        round=1,
        attempt=1,
        phase=Phase.reporting,
        target=len(updates),
        goal=len(updates),
        minimum=1,
        selection_deadline=0.0,
        reporting_deadline=time.time() + 600,
        aggregators=names,
        master=names[0],
        token=token,
    )
    store.put_round(job.key, token, state)
    aggs = [Aggregator(job, store, actor_id=n, secret=SECRET) for n in names]
    busy = [0.0] * pool
    for i, data in enumerate(updates):
        k = i % pool
        device = f"d{i}"
        env = ReportEnvelope(
            device, state.key, report_ticket(SECRET, job.key, state.key, device), 10, data
        )
        started = time.perf_counter()
        aggs[k].accept(env)
        busy[k] += time.perf_counter() - started
    return busy


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--devices", type=int, default=130)
    ap.add_argument("--round-seconds", type=float, default=0.0, help="0: small model needs 2")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n = args.devices
    probe = _job(HIDDEN["small"], n, 1 << 30)
    small_updates = _updates(probe, n, rng)
    # One aggregator's capacity, measured: update bytes folded per second of fold time.
    best = min(sum(fold_round(probe, small_updates, 1)) for _ in range(args.repeats))
    small_bytes = update_bytes(list(task_of(probe).shapes))
    capacity = n * small_bytes / best
    budget = args.round_seconds or n * small_bytes / (1.5 * capacity)
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}, numpy {np.__version__}"
    )
    print(
        f"# {n} reports a round; one aggregator folds {capacity / 2**20:.1f} MiB/s "
        f"(measured); round budget {budget * 1000:.0f} ms"
    )
    fixed_pool = 0
    rows: list[dict[str, Any]] = []
    for label, hidden in HIDDEN.items():
        job = _job(hidden, n, capacity)
        updates = small_updates if hidden == HIDDEN["small"] else _updates(job, n, rng)
        size = update_bytes(list(task_of(job).shapes))
        load = PoolLoad(selected_devices=n, update_bytes=size, round_seconds=budget)
        sized = size_pool(PoolPolicy.of(job.spec), load).count
        fixed_pool = fixed_pool or sized
        row: dict[str, Any] = {"model": label, "update": size, "sized": sized, "fixed": fixed_pool}
        for kind, pool in (("sized", sized), ("fixed", fixed_pool)):
            runs = [max(fold_round(job, updates, pool)) for _ in range(args.repeats)]
            row[f"{kind}_ms"] = 1000 * min(runs)  # best of the repeats: the machine is shared
            row[f"{kind}_median_ms"] = 1000 * statistics.median(runs)
        rows.append(row)
    print(
        f"{'model':<12} {'update':>10} {'sized pool':>10} {'fold/round (median)':>22} "
        f"{'fixed pool':>10} {'fold/round (median)':>22}"
    )
    for r in rows:
        print(
            f"{r['model']:<12} {r['update'] / 1024:>7.0f} KiB {r['sized']:>10} "
            f"{r['sized_ms']:>8.1f} ms ({r['sized_median_ms']:>6.1f} ms) {r['fixed']:>10} "
            f"{r['fixed_ms']:>8.1f} ms ({r['fixed_median_ms']:>6.1f} ms)"
        )
    small, large = rows
    print(
        f"# large / small folding time per round: sized pool "
        f"{large['sized_ms'] / small['sized_ms']:.2f}x, fixed pool "
        f"{large['fixed_ms'] / small['fixed_ms']:.2f}x "
        f"(update size {large['update'] / small['update']:.1f}x)"
    )
    assert math.isfinite(large["sized_ms"])


if __name__ == "__main__":
    main()
