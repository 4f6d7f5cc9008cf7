"""Scale benchmark of the embedded runner: 1,000 devices a round, and aggregation memory.

Three parts, in this order, in one process:

1. **run_job at scale** (``fedfleet.embedded.run_job``, untraced): MNIST-5k, a 784-200-10 MLP
   (159,010 parameters), 2,000 simulated devices, goal count 1,000 with over-selection 1.3
   (1,300 selected), 8% drop-outs, E=1, B=10, lr 0.05, FedAvg, eligibility relaxed (every
   device always charging, idle, unmetered and available). MNIST-5k holds 4,000 training
   examples, so each of the 2,000 devices holds 2 (one minibatch, smaller than B): the work per
   device is tiny and the figures are dominated by the system around it, which is the point.
   Prints every attempt's ``JobResult.rounds[i].seconds`` and the process's peak RSS
   (``ru_maxrss``) before and after the run.
2. **the same job under tracemalloc** (``--no-trace`` skips it): ``Aggregator.accept`` is
   wrapped (in this process only) to record, per report, the traced memory it allocates and
   frees (decode copy, validation) and what it leaves behind, and the simulated fleet's
   encoded uploads in flight (trained, not yet reported) are counted. Shows that what an
   aggregator keeps is its StreamingSum plus a few bytes of bookkeeping per report, and that
   the RSS of part 1 is the simulated devices' pending uploads, not aggregation.
3. **StreamingSum against a batch average**, no runner: N float32 updates of the MLP are
   generated one at a time (into a buffer allocated before tracing, so the generator itself
   allocates nothing) and folded into a StreamingSum (validated, as ``add`` does by default),
   then averaged; tracemalloc's peak over the fold and the mean is the StreamingSum's memory.
   The batch baseline keeps every update as a row of one preallocated float32 N x P matrix
   (the cheapest way to hold them all) and averages with one float32 matrix-vector product;
   its peak is O(N x model). Same updates (same seed) for both; the means are compared.

This is a report, not a test: it exits 0 whatever the figures (non-zero only on bad usage).

    python bench/scale.py [--rounds N] [--devices N] [--shards N] [--no-trace] [--skip-run]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import resource
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.aggregation import StreamingSum
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.results import JobResult
from fedfleet.tasks import load_task, task_of

GOAL_COUNT = 1000
OVER_SELECTION = 1.3
DEVICES = 2000
HIDDEN = 200
LEARNING_RATE = 0.05
BATCH_SIZE = 10
DROPOUT_RATE = 0.08
SIZES = (10, 100, 1000, 3000)
BATCH_MAX = 1000
MIB = 1024 * 1024


def manifest(rounds: int, devices: int, shards: int) -> dict[str, Any]:
    return {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": "bench-scale"},
        "spec": {
            "population": "bench-scale",
            "model": {"kind": "mlp", "inputs": 784, "classes": 10, "hidden": [HIDDEN]},
            "plan": {"localEpochs": 1, "batchSize": BATCH_SIZE, "learningRate": LEARNING_RATE},
            "rounds": {
                "total": rounds,
                "goalCount": GOAL_COUNT,
                "overSelection": OVER_SELECTION,
            },
            "aggregation": {"algorithm": "fedavg"},
            "fleet": {
                "devices": devices,
                "dataset": "mnist",
                "shardsPerDevice": shards,
                "dropoutRate": DROPOUT_RATE,
                "availability": {"peak": 1.0, "trough": 1.0},
            },
            "eligibility": {
                "requireCharging": False,
                "requireUnmetered": False,
                "requireIdle": False,
            },
        },
    }


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


# -- part 1 --------------------------------------------------------------------------------------
def print_rounds(result: JobResult) -> None:
    print(
        f"{'round':>5}{'selected':>10}{'reported':>10}{'dropped':>9}{'abandoned':>11}"
        f"{'accuracy':>10}{'wall s':>9}{'sim s':>8}"
    )
    for r in result.rounds:
        acc = f"{r.accuracy:.4f}" if r.accuracy is not None else "-"
        print(
            f"{r.round:>5}{r.selected:>10}{r.reported:>10}{r.dropped:>9}"
            f"{('yes: ' + r.reason) if r.abandoned else 'no':>11}{acc:>10}"
            f"{r.seconds:>9.3f}{r.sim_seconds:>8.0f}"
        )


def run_untraced(job: FLJob) -> None:
    from fedfleet.device.datasets import load_dataset
    from fedfleet.embedded import run_job

    load_dataset(job.spec.fleet.dataset)  # cached: RSS before the run includes the raw dataset
    rss_before = max_rss_mib()
    start = time.perf_counter()
    result = run_job(job)
    wall = time.perf_counter() - start
    rss_after = max_rss_mib()
    print_rounds(result)
    print(
        "(round 1's wall s also covers building the 2,000 simulated devices and the actors, and\n"
        " the first check-ins: run_job starts that clock before them)"
    )
    committed = [r.seconds for r in result.rounds if not r.abandoned]
    per_round = f"{sum(committed) / len(committed):.3f}" if committed else "-"
    print(
        f"run_job wall {wall:.2f} s (its own {result.wall_seconds:.2f} s), "
        f"succeeded={result.succeeded}, final accuracy "
        f"{result.final_accuracy if result.final_accuracy is not None else '-'}, "
        f"mean wall s per committed round {per_round}"
    )
    print(
        f"peak RSS (ru_maxrss): {rss_before:.0f} MiB before run_job (imports + MNIST), "
        f"{rss_after:.0f} MiB after (+{rss_after - rss_before:.0f} MiB)"
    )


# -- part 2 --------------------------------------------------------------------------------------
@dataclass
class AcceptTrace:
    """What tracemalloc saw around every ``Aggregator.accept`` of the traced run."""

    calls: int = 0
    refused: int = 0
    transient_max: int = 0
    """Largest (peak during one accept) - (traced memory after it): what one report allocates
    and frees again (the decoded copy, validation temporaries), bytes."""
    retained: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    """Per (aggregator, round): memory left behind by each successful accept, in order."""
    sum_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    """Per (aggregator, round): bytes of the StreamingSum's float64 sums."""
    global_peak: int = 0
    in_flight: int = 0
    in_flight_peak: int = 0


def run_traced(job: FLJob) -> AcceptTrace:
    """Run the job again under tracemalloc with bench-side wrappers (restored afterwards)."""
    from fedfleet.aggregator.actor import Aggregator
    from fedfleet.core.protocol import ReportEnvelope, Task
    from fedfleet.device.runtime import FLRuntime
    from fedfleet.embedded import run_job
    from fedfleet.selector.actor import Selector

    trace = AcceptTrace()
    orig_accept = Aggregator.accept
    orig_execute = FLRuntime.execute
    orig_report = Selector.report

    def accept(self: Aggregator, env: ReportEnvelope) -> None:
        before, peak = tracemalloc.get_traced_memory()
        trace.global_peak = max(trace.global_peak, peak)
        tracemalloc.reset_peak()
        trace.calls += 1
        ok = False
        try:
            orig_accept(self, env)
            ok = True
        finally:
            after, peak = tracemalloc.get_traced_memory()
            trace.transient_max = max(trace.transient_max, peak - max(before, after))
            if ok:
                key = (self.actor_id, env.round_key)
                trace.retained[key].append(after - before)
                partial = self.partial(env.round_key)
                if partial is not None:
                    trace.sum_bytes[key] = sum(a.nbytes for a in partial.sums)
            else:
                trace.refused += 1

    def execute(
        self: FLRuntime, task: Task, now: float, still_eligible: Callable[[int], bool]
    ) -> ReportEnvelope:
        env = orig_execute(self, task, now, still_eligible)
        trace.in_flight += len(env.update)
        trace.in_flight_peak = max(trace.in_flight_peak, trace.in_flight)
        return env

    def report(self: Selector, env: ReportEnvelope, aggregator: str) -> None:
        trace.in_flight -= len(env.update)
        orig_report(self, env, aggregator)

    Aggregator.accept = accept  # type: ignore[method-assign]
    FLRuntime.execute = execute  # type: ignore[method-assign]
    Selector.report = report  # type: ignore[method-assign]
    tracemalloc.start()
    try:
        run_job(job)
        trace.global_peak = max(trace.global_peak, tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
        Aggregator.accept = orig_accept  # type: ignore[method-assign]
        FLRuntime.execute = orig_execute  # type: ignore[method-assign]
        Selector.report = orig_report  # type: ignore[method-assign]
    return trace


def print_trace(trace: AcceptTrace, update_bytes: int) -> None:
    print(
        "kept = traced memory left behind by the round's accepts (its StreamingSum and\n"
        "bookkeeping); sums = the StreamingSum's float64 arrays; 1st = kept by the first\n"
        "accept; B/extra report = (kept - 1st) / (reports - 1)"
    )
    print(f"{'aggregator':<14}{'round':<10}{'reports':>8}{'kept KiB':>10}{'sums KiB':>10}"
          f"{'1st KiB':>9}{'B/extra report':>16}")  # fmt: skip
    for (agg, key), kept in sorted(trace.retained.items()):
        extra = (sum(kept) - kept[0]) / (len(kept) - 1) if len(kept) > 1 else 0.0
        print(
            f"{agg:<14}{key[:9]:<10}{len(kept):>8}{sum(kept) / 1024:>10.0f}"
            f"{trace.sum_bytes.get((agg, key), 0) / 1024:>10.0f}{kept[0] / 1024:>9.0f}"
            f"{extra:>16.0f}"
        )
    print(
        f"accept calls {trace.calls} ({trace.refused} refused: late or over the goal); "
        f"largest temporary of one accept {trace.transient_max / 1024:.0f} KiB "
        f"(one float32 update is {update_bytes / 1024:.0f} KiB)"
    )
    print(
        f"traced peak of the whole run {trace.global_peak / MIB:.0f} MiB; encoded uploads held "
        f"by simulated devices between training and reporting peaked at "
        f"{trace.in_flight_peak / MIB:.0f} MiB"
    )


# -- part 3 --------------------------------------------------------------------------------------
@dataclass
class FoldResult:
    peak: int
    seconds: float
    mean: list[NDArray[np.float32]]


def _updates(
    shapes: Sequence[tuple[int, ...]], n: int, seed: int
) -> tuple[np.random.Generator, list[NDArray[np.float32]], NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, 60, size=n).astype(np.float64)  # example counts
    bufs = [np.empty(s, dtype=np.float32) for s in shapes]
    return rng, bufs, weights


def _next_update(rng: np.random.Generator, bufs: list[NDArray[np.float32]]) -> None:
    for b in bufs:
        rng.standard_normal(out=b, dtype=np.float32)


def fold_streaming(shapes: Sequence[tuple[int, ...]], n: int, seed: int) -> FoldResult:
    rng, bufs, weights = _updates(shapes, n, seed)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    start = time.perf_counter()
    acc = StreamingSum(shapes)
    for i in range(n):
        _next_update(rng, bufs)
        acc.add(bufs, float(weights[i]))  # validates shapes, dtype and finiteness first
    mean = acc.mean()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return FoldResult(peak, seconds, mean)


def fold_batch(shapes: Sequence[tuple[int, ...]], n: int, seed: int) -> FoldResult:
    rng, bufs, weights = _updates(shapes, n, seed)
    sizes = [math.prod(s) for s in shapes]
    offsets = np.cumsum([0, *sizes])
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    start = time.perf_counter()
    held = np.empty((n, int(offsets[-1])), dtype=np.float32)  # every update, one row each
    for i in range(n):
        _next_update(rng, bufs)
        for b, lo, hi in zip(bufs, offsets[:-1], offsets[1:], strict=True):
            held[i, lo:hi] = b.reshape(-1)
    flat = (weights / weights.sum()).astype(np.float32) @ held
    spans = zip(shapes, offsets[:-1], offsets[1:], strict=True)
    mean = [flat[lo:hi].reshape(s) for s, lo, hi in spans]
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del held
    return FoldResult(peak, seconds, mean)


def memory_table(sizes: Sequence[int], batch_max: int) -> None:
    shapes = task_of(parse_manifest(manifest(1, DEVICES, 0))).shapes
    p = sum(math.prod(s) for s in shapes)
    scratch = min(max(math.prod(s) for s in shapes), 65536) * 8
    print(
        f"model 784-{HIDDEN}-10: {p:,} params; float32 {p * 4 / MIB:.2f} MiB, float64 sums "
        f"{p * 8 / MIB:.2f} MiB, StreamingSum scratch {scratch / MIB:.2f} MiB"
    )
    print(
        f"{'N updates':>10}{'streaming MiB':>15}{'batch MiB':>11}{'batch/streaming':>17}"
        f"{'stream us/upd':>15}{'batch us/upd':>14}{'max |mean diff|':>17}"
    )
    for n in sizes:
        s = fold_streaming(shapes, n, seed=n)
        b = fold_batch(shapes, n, seed=n) if n <= batch_max else None
        row = f"{n:>10}{s.peak / MIB:>15.2f}"
        if b is not None:
            diff = max(float(np.max(np.abs(x - y))) for x, y in zip(s.mean, b.mean, strict=True))
            row += (
                f"{b.peak / MIB:>11.1f}{b.peak / s.peak:>17.0f}"
                f"{s.seconds / n * 1e6:>15.0f}{b.seconds / n * 1e6:>14.0f}{diff:>17.1e}"
            )
        else:
            row += f"{'-':>11}{'-':>17}{s.seconds / n * 1e6:>15.0f}{'-':>14}{'-':>17}"
        print(row, flush=True)
    print(
        "streaming = tracemalloc peak over StreamingSum(shapes), N x add (validated), mean():\n"
        "the float64 sums + the scratch + the float32 mean it returns, whatever N;\n"
        "batch = the same updates kept as rows of a float32 N x P matrix, then one float32\n"
        "matrix-vector weighted average (the cheapest batch: no list, no float64 copy).\n"
        "Update generation (in both) writes into a buffer allocated before tracing; it is\n"
        "most of the us/upd columns (159,010 standard normals per update)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="committed rounds (3-5 is usual)")
    parser.add_argument("--devices", type=int, default=DEVICES, help="simulated devices")
    parser.add_argument("--shards", type=int, default=0, help="label shards per device; 0 = IID")
    parser.add_argument("--no-trace", action="store_true", help="skip the tracemalloc run")
    parser.add_argument("--skip-run", action="store_true", help="only the StreamingSum table")
    parser.add_argument(
        "--sizes",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=SIZES,
        help="updates folded per row of the memory table, comma-separated",
    )
    parser.add_argument("--batch-max", type=int, default=BATCH_MAX, help="largest N for batch")
    args = parser.parse_args()
    selected = math.ceil(GOAL_COUNT * OVER_SELECTION - 1e-9)
    if args.rounds < 1 or args.devices < selected or args.shards < 0 or min(args.sizes) < 1:
        parser.error(f"need --rounds >= 1, --devices >= {selected}, --shards >= 0, sizes >= 1")

    print(f"fedfleet scale benchmark, {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cores, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}"
    )
    print(f"load average at start: {load_average()}", flush=True)

    if not args.skip_run:
        job = parse_manifest(manifest(args.rounds, args.devices, args.shards))
        spec = job.spec
        examples = 5000 - round(5000 * spec.fleet.test_fraction)
        print(
            f"\nworkload: MNIST-5k ({examples} train examples over {args.devices} devices, "
            f"~{examples / args.devices:.1f} each, "
            f"{'IID' if args.shards == 0 else f'{args.shards} label shards'}), "
            f"MLP 784-{HIDDEN}-10, goal {GOAL_COUNT} x over-selection {OVER_SELECTION} = "
            f"{spec.rounds.selection_target} selected, {spec.actors.aggregator_count(spec.rounds)}"
            f" aggregators, drop-out {DROPOUT_RATE}, E=1 B={BATCH_SIZE} lr={LEARNING_RATE}, "
            f"{args.rounds} rounds, eligibility relaxed"
        )
        print("==> part 1: run_job, untraced", flush=True)
        run_untraced(job)
        if not args.no_trace:
            print("\n==> part 2: the same run under tracemalloc (slower; memory only)", flush=True)
            update_bytes = sum(math.prod(s) for s in load_task(spec.effective_task).shapes) * 4
            print_trace(run_traced(job), update_bytes)
    print("\n==> part 3: aggregation memory against devices per round", flush=True)
    memory_table(args.sizes, args.batch_max)
    print(f"\npeak RSS of the whole process {max_rss_mib():.0f} MiB (part 3's batch included)")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
