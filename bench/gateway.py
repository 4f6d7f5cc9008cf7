"""What the population gateway's hop costs a check-in: the gateway against its selector, same run.

Both targets are real processes on loopback: one job's selector (``fedfleet selector`` with the
population secret, over a real redis-server, no coordinator: every check-in is answered with a
reconnect window, the common case at scale) and ``fedfleet population gateway`` in front of it.
The load is this script: ``--concurrency`` asyncio workers with keep-alive connections, each
sending byte-identical check-ins of enrolled devices (population credentials, ``--devices`` of
them so that no device passes its per-device rate limit of one check-in a second) first to the
selector directly, then through the gateway, alternating ``--repeats`` times for
``--duration`` seconds each. Every answer must be 200 with ``"outcome":"reconnect"``.

It prints requests per second, latency percentiles and the servers' CPU time per check-in
(from /proc) of each, and the gateway / selector ratios. The load generator (Python, httpx)
shares the machine's two cores with both servers and bounds the request rate, so requests per
second and latencies are the generator's; the CPU each server spends per check-in is the
load-independent figure, and the cost of the hop is the gateway's share of it. A report, not
a test: exits 0.

    python bench/gateway.py [--duration 5] [--repeats 3] [--concurrency 32] [--devices 40000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from fedfleet.core.spec import FLJob
from fedfleet.local import LocalDeployment, actor_environment
from fedfleet.redis_server import RedisServer, free_port
from fedfleet.service.enrollment import PopulationKeys

POPULATION = "bench-gw"


def _job() -> FLJob:
    return FLJob.model_validate(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "bench-gw"},
            "spec": {
                "population": POPULATION,
                "rounds": {"total": 1000, "goalCount": 10},
                "fleet": {"devices": 100, "dataset": "digits"},
                "actors": {"selectors": 1},
            },
        }
    )


async def _load(
    url: str, requests: list[tuple[dict[str, str], bytes]], start: int, seconds: float, workers: int
) -> tuple[int, list[float], int]:
    """Check-ins for ``seconds``: (answers, latencies in ms, bad answers)."""
    latencies: list[float] = []
    bad = 0
    deadline = time.perf_counter() + seconds
    cursor = start
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:

        async def worker() -> None:
            nonlocal cursor, bad
            while time.perf_counter() < deadline:
                headers, body = requests[cursor % len(requests)]
                cursor += 1
                t0 = time.perf_counter()
                r = await client.post("/v1/checkin", content=body, headers=headers)
                latencies.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200 or b'"outcome":"reconnect"' not in r.content:
                    bad += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
    return len(latencies), latencies, bad


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--devices", type=int, default=40000)
    args = parser.parse_args()

    secret = secrets.token_bytes(32)
    keys = PopulationKeys.from_secret(secret, POPULATION)
    now = time.time()
    requests = []
    for i in range(args.devices):
        device = f"d-{i:08d}"
        body = {
            "device_id": device,
            "population": POPULATION,
            "charging": True,
            "unmetered": True,
            "idle": True,
            "num_examples": 10,
        }
        headers = {
            "authorization": f"Bearer {keys.issue(device, now).token}",
            "x-fedfleet-device": device,
            "content-type": "application/json",
        }
        requests.append((headers, json.dumps(body, separators=(",", ":")).encode()))

    work = Path(tempfile.mkdtemp(prefix="fedfleet-bench-gw-"))
    secret_file = work / "population-secret"
    secret_file.write_text(secret.hex())
    results: dict[str, list[tuple[float, list[float], int]]] = {"selector": [], "gateway": []}
    cpu: dict[str, list[tuple[float, float]]] = {"selector": [], "gateway": []}
    """Per run: (selector CPU µs, gateway CPU µs) per check-in."""
    with RedisServer(work / "redis") as redis:
        deployment = LocalDeployment(
            _job(),
            store_url=redis.url,
            workdir=work / "job",
            selectors=1,
            aggregators=0,
            coordinators=0,
            population_secret=secret,
        )
        port = free_port("127.0.0.1")
        gateway_url = f"http://127.0.0.1:{port}"
        with deployment, open(work / "gateway.log", "wb") as log:
            gateway = subprocess.Popen(
                [
                    sys.executable,
                    *("-P", "-m", "fedfleet.cli", "population", "gateway"),
                    *("--population", POPULATION, "--population-secret-file", str(secret_file)),
                    *("--store", redis.url, "--port", str(port), "--log-level", "WARNING"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=actor_environment(),
            )
            try:
                selector_url = deployment.urls("selector")[0]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        ready = httpx.get(f"{gateway_url}/readyz", timeout=2).json()
                        if ready.get("routes") == 1:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)
                else:
                    raise SystemExit("the gateway never saw the selector's route")
                cursor = 0
                for _ in range(args.repeats):
                    for name, url in (("selector", selector_url), ("gateway", gateway_url)):
                        asyncio.run(_load(url, requests, cursor, 1.0, args.concurrency))  # warm
                        pids = (deployment.actors["selector-0"].proc.pid, gateway.pid)  # type: ignore[union-attr]
                        before = [_cpu(pid) for pid in pids]
                        n, lat, bad = asyncio.run(
                            _load(url, requests, cursor, args.duration, args.concurrency)
                        )
                        used = [_cpu(pid) - b for pid, b in zip(pids, before, strict=True)]
                        cpu[name].append((used[0] / n * 1e6, used[1] / n * 1e6))
                        cursor += n
                        results[name].append((n / args.duration, lat, bad))
                        rate, p50, p95 = n / args.duration, _pct(lat, 0.5), _pct(lat, 0.95)
                        print(
                            f"{name:8s} {rate:8.0f} req/s  p50 {p50:6.2f} ms  p95 {p95:6.2f} ms"
                            f"  CPU/check-in: selector {cpu[name][-1][0]:5.0f} µs, gateway "
                            f"{cpu[name][-1][1]:5.0f} µs  bad {bad}",
                            flush=True,
                        )
            finally:
                gateway.terminate()
                gateway.wait(15)
    load = os.getloadavg()
    sel = [r for r, _, _ in results["selector"]]
    gw = [r for r, _, _ in results["gateway"]]
    sel_lat = [x for _, lat, _ in results["selector"] for x in lat]
    gw_lat = [x for _, lat, _ in results["gateway"] for x in lat]
    bad = sum(b for rs in results.values() for _, _, b in rs)
    print(
        f"\ncheck-ins answered with a reconnect window, {args.concurrency} concurrent, "
        f"{args.repeats} x {args.duration:g} s each, load {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    )
    print(
        f"{'path':8s} {'req/s (median)':>15s} {'p50 ms':>8s} {'p95 ms':>8s} "
        f"{'selector CPU µs':>16s} {'gateway CPU µs':>15s}  (per check-in, median)"
    )
    for name, rates, lat in (("selector", sel, sel_lat), ("gateway", gw, gw_lat)):
        s_cpu = statistics.median(c[0] for c in cpu[name])
        g_cpu = statistics.median(c[1] for c in cpu[name])
        print(
            f"{name:8s} {statistics.median(rates):15.0f} {_pct(lat, 0.5):8.2f} "
            f"{_pct(lat, 0.95):8.2f} {s_cpu:16.0f} {g_cpu:15.0f}"
        )
    direct = statistics.median(c[0] for c in cpu["selector"])
    via = statistics.median(c[0] + c[1] for c in cpu["gateway"])
    print(
        f"server CPU per check-in through the gateway / direct: {via / direct:.2f} "
        "(the load generator, not the servers, bounds req/s here)"
    )
    print(
        f"gateway / selector: throughput {statistics.median(gw) / statistics.median(sel):.2f}, "
        f"p50 latency {_pct(gw_lat, 0.5) / _pct(sel_lat, 0.5):.2f}x; bad answers {bad}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
