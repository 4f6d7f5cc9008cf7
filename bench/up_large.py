"""A larger round over HTTP (issue 16): 2,000 simulated devices, goal count 500, 20 rounds.

The deployed shape of ``bench/up.py`` (a redis-server, a coordinator and its standby, two
selectors and two aggregators, each its own process, and the simulated fleet over real HTTP in
this process) with rounds 50 times larger: the shared workload's digits model and data, split
over 2,000 devices (IID, ``shardsPerDevice: 0``), 500 reports needed per round, no
over-selection and no drop-outs. The simulator's per-device training delay is scaled to 20 ms,
as in ``up.py``. It prints:

- the round-time distribution (p50, p95, max) over the committed rounds: the interval between
  consecutive commits, the first round (which includes start-up) left out;
- the check-ins per second the two selectors served (their own ``fedfleet_checkins_total``
  counters over the job's wall time) and how they were answered;
- the CPU time per accepted report of each actor role (each process's CPU from ``/proc``,
  start-up included, over the reports the job committed), and of the fleet simulator (this
  process, which also holds 2,000 devices' runtimes).

A report, not a test: exit 0 whatever the figures.

    .venv/bin/python bench/up_large.py [--devices 2000] [--goal 500] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import httpx  # noqa: E402

import workload  # noqa: E402
from embedded import load_average  # noqa: E402
from fedfleet.core.spec import FLJob, parse_manifest  # noqa: E402
from fedfleet.device.http_fleet import HttpFleet  # noqa: E402
from fedfleet.local import LocalDeployment  # noqa: E402
from fedfleet.results import JobResult  # noqa: E402
from fedfleet.up import UpOptions, follow  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def job(devices: int, goal: int, rounds: int) -> FLJob:
    doc = workload.manifest(rounds)
    doc["metadata"]["name"] = "bench-large"
    spec = doc["spec"]
    spec["rounds"].update(goalCount=goal, selectionTimeoutSeconds=120, reportingTimeoutSeconds=240)
    spec["fleet"].update(devices=devices, shardsPerDevice=0)
    spec["actors"] = {"selectors": 2, "devicesPerAggregator": max(1, goal // 2)}
    return parse_manifest(doc)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def checkins(url: str) -> dict[str, float]:
    """The selector's ``fedfleet_checkins_total`` by outcome."""
    out: dict[str, float] = defaultdict(float)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("fedfleet_checkins_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] += float(line.rsplit(" ", 1)[1])
    return out


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--goal", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--time-scale", type=float, default=0.001)
    parser.add_argument("--tick", type=float, default=0.25)
    args = parser.parse_args()
    print(f"load average at start: {load_average()}", flush=True)
    fl = job(args.devices, args.goal, args.rounds)
    result = JobResult(job=fl.name)
    cpu: dict[str, float] = {}
    served: dict[str, float] = defaultdict(float)
    self_cpu0 = time.process_time()
    t0 = time.perf_counter()
    with LocalDeployment(fl, tick_seconds=args.tick, lease_ttl=3.0) as d:
        started = time.perf_counter() - t0

        async def run() -> bool:
            fleet = HttpFleet(
                fl,
                d.urls("selector"),
                d.keys,
                time_scale=args.time_scale,
                rest_seconds=UpOptions().rest_seconds,
                concurrency=256,
                max_long_polls=2048,
            )
            stop = asyncio.Event()
            task = asyncio.create_task(fleet.run(until=stop))
            try:
                return await follow(d, result, None, timeout=1800, poll=0.05)
            finally:
                stop.set()
                await task

        finished = asyncio.run(run())
        wall = time.perf_counter() - t0
        for actor in d.actors.values():
            if actor.proc is not None and actor.proc.poll() is None:
                cpu[actor.actor_id] = cpu_seconds(actor.proc.pid)
            if actor.role == "selector":
                for outcome, n in checkins(actor.url).items():
                    served[outcome] += n
        history = d.store.metrics(fl.key)
        attempts = d.store.attempts(fl.key)
    fleet_cpu = time.process_time() - self_cpu0
    committed = [r for r in result.rounds if not r.abandoned]
    abandoned = [f"{r.reason} after {r.seconds:.1f}s" for r in result.rounds if r.abandoned]
    reports = sum(r.reported for r in committed)
    print(
        f"\n{args.devices} devices, goal {args.goal}, {args.rounds} rounds: finished={finished}, "
        f"{len(committed)} committed, {len(abandoned)} abandoned"
        + (f" ({'; '.join(abandoned)})" if abandoned else "")
    )
    print(f"wall {wall:.1f} s (processes up in {started:.1f} s); {reports} reports accepted")
    if history:
        print(f"final accuracy {float(history[-1]['accuracy']):.4f}")
    ends = sorted(float(a["ended_at"]) for a in attempts if not a.get("abandoned"))
    intervals = [b - a for a, b in itertools.pairwise(ends)]
    if intervals:
        print(
            f"round time: p50 {statistics.median(intervals):.2f} s, "
            f"p95 {quantile(intervals, 0.95):.2f} s, max {max(intervals):.2f} s "
            f"(n={len(intervals)}, first round left out)"
        )
    total = sum(served.values())
    answers = ", ".join(f"{k} {int(v)}" for k, v in sorted(served.items()))
    print(f"check-ins served: {total / wall:.0f}/s over {wall:.1f} s ({int(total)}: {answers})")
    by_role: dict[str, float] = defaultdict(float)
    for actor_id, seconds in cpu.items():
        by_role[actor_id.rsplit("-", 1)[0]] += seconds
    by_role["fleet simulator (this process)"] = fleet_cpu
    print("CPU per accepted report (start-up included):")
    for role, seconds in by_role.items():
        per = 1000 * seconds / reports if reports else float("nan")
        print(f"  {role:<32} {seconds:7.2f} CPU-s  {per:6.2f} ms/report")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
