"""The shared digits workload through the deployed shape (``fedfleet up``) against Flower.

fedfleet here is the full deployed system on one machine: a redis-server, a coordinator and
its standby, two selectors and two aggregators, each its own uvicorn process, and the
simulated fleet talking real HTTP to the selectors. Its wall time runs from starting the
first process to the job's Succeeded in the store, so it includes starting every process,
as Flower's includes starting Ray. Flower runs its Simulation Engine once, as in
``bench/embedded.py``. Target: fedfleet faster than Flower. The fleet simulator makes each
device take ``fleet.trainSeconds`` of simulated time on top of the real training; Flower's
clients have no such delay, so it is scaled down to 20 ms here (``--time-scale``).

    .venv/bin/python bench/up.py [--skip-flower] [--rounds N] [--time-scale X]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402
from embedded import Measured, load_average, run_flower  # noqa: E402
from fedfleet.device.http_fleet import HttpFleet  # noqa: E402
from fedfleet.local import LocalDeployment  # noqa: E402
from fedfleet.results import JobResult  # noqa: E402
from fedfleet.up import UpOptions, follow  # noqa: E402


def run_fedfleet_up(rounds: int, time_scale: float) -> Measured:
    measured = Measured("fedfleet up (HTTP + Redis)")
    job = workload.fljob(rounds)
    result = JobResult(job=job.name)
    t0 = time.perf_counter()
    with LocalDeployment(job, tick_seconds=0.05, lease_ttl=3.0) as d:
        started = time.perf_counter() - t0

        async def main() -> bool:
            fleet = HttpFleet(
                job,
                d.urls("selector"),
                d.keys,
                time_scale=time_scale,
                rest_seconds=UpOptions().rest_seconds,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(fleet.run(until=stop))
            try:
                return await follow(d, result, None, timeout=900, poll=0.05)
            finally:
                stop.set()
                await task

        finished = asyncio.run(main())
        wall = time.perf_counter() - t0
        history = d.store.metrics(job.key)
    committed = [r for r in result.rounds if not r.abandoned]
    if not finished or len(committed) != rounds:
        measured.error = f"finished={finished}, {len(committed)} of {rounds} rounds committed"
        return measured
    measured.walls = [wall]
    measured.final_accuracy = float(history[-1]["accuracy"])
    measured.note = f"processes up in {started:.1f}s; {len(result.rounds)} attempts"
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=workload.ROUNDS)
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.001,
        help=(
            "real seconds per simulated second of device training (0.001: the simulator's"
            " 20 s of device time becomes 20 ms; Flower's clients sleep for none)"
        ),
    )
    args = parser.parse_args()
    print(f"load average at start: {load_average()}")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}", flush=True)
    ours = run_fedfleet_up(args.rounds, args.time_scale)
    flower = Measured("flower 1.42 (ray)") if args.skip_flower else run_flower(args.rounds)
    if args.skip_flower:
        flower.error = "skipped"
    print(f"\n{'implementation':<28} {'wall s':>8} {'accuracy':>9}  note")
    for m in (ours, flower):
        wall = f"{m.wall:.2f}" if m.wall is not None else "-"
        acc = f"{m.final_accuracy:.4f}" if m.final_accuracy is not None else "-"
        print(f"{m.name:<28} {wall:>8} {acc:>9}  {m.error or m.note}")
    if ours.wall is not None and flower.wall is not None:
        ratio = ours.wall / flower.wall
        verdict = "PASS" if ratio < 1.0 else "MISS"
        print(f"\nfedfleet up / Flower wall time: {ratio:.3f}  {verdict} (target < 1)")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
