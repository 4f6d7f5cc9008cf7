"""Check-in throughput of one selector process against a bare FastAPI endpoint, same run.

Targets, both served by uvicorn with the settings ``fedfleet selector`` uses (loop and http
``auto``, i.e. uvloop and httptools; ``access_log=False``, ``log_config=None``), both pinned
to one core (``--server-core``):

- **fedfleet**: ``python -m fedfleet.cli selector`` over a real redis-server — bearer-token
  check, ``CheckInRequest`` parsing, the Selector actor's local decision, a reconnect window
  (or a selection), ``CheckInResponse`` serialization, metrics;
- **bare**: a FastAPI app written to a temp dir: one ``POST /v1/checkin`` that parses the same
  ``fedfleet.selector.app.CheckInRequest`` body and returns a small JSON; no auth, no logic.

The load generator is ``wrk`` (Debian package ``wrk``) pinned to the other core
(``--load-core``), one thread, ``--connections`` keep-alive connections, cycling through
``--devices`` pre-built requests (device id, its real ``JobKeys.device_token``, JSON body);
both targets get byte-identical requests. Redis, the coordinator, the aggregator and this
driver are pinned to the load core so the server core runs the target alone. Each target is
warmed for ``--warmup`` s, then measured for ``--duration`` s, alternating fedfleet / bare
``--repeats`` times, in two variants:

- ``reconnect``: no coordinator, so no quota: every check-in gets a reconnect window (the
  common case at scale: almost every device that checks in is not needed now);
- ``selecting``: a coordinator and an aggregator run, quotas are pushed, rounds open and
  select (short timeouts so new rounds keep opening); most check-ins still get a window.

Before the load each target is asked once with httpx (fedfleet must answer 200 ``reconnect``
in the first variant and 200 ``selected`` in the second). During the load wrk's Lua
``response`` hook counts non-2xx answers and the 2xx bodies holding ``"outcome":"reconnect"``
or ``"outcome":"selected"``: every answer must be one of those. After each fedfleet run its own
``fedfleet_checkins_total`` counters must have grown by at least wrk's request count with no
``unavailable`` outcome. Server CPU % is the target process's CPU time over the measured
interval: below ~90 % means another process took part of the server core, and then the
requests per CPU-second of the server ("per cpu-s") are the fairer comparison and the verdict
uses them. Several short alternations (4 x 5 s) pool better than two long ones on a machine
with busy neighbours.

A report, not a test: exits 0 whatever the figures.

    python bench/checkin.py [--duration 5] [--warmup 2] [--connections 64] [--repeats 4]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedfleet.core.spec import parse_manifest
from fedfleet.local import RedisProcess, free_port, manifest_yaml
from fedfleet.service.keys import JobKeys, new_secret

TARGET_RATIO = 0.70
SHARED_CPU_PCT = 90.0
"""A run whose server got less of its core than this was sharing it with another process."""
POPULATION = "bench"
JOB = "bench-checkin"
HOST = "127.0.0.1"

BARE_APP = '''\
"""Bare baseline: parse the selector's CheckInRequest and answer a small JSON."""

import sys

import uvicorn
from fastapi import FastAPI

from fedfleet.selector.app import CheckInRequest

app = FastAPI()


@app.post("/v1/checkin")
async def check_in(body: CheckInRequest) -> dict[str, str]:
    return {"outcome": "reconnect"}


if __name__ == "__main__":
    config = uvicorn.Config(
        app,
        host=sys.argv[1],
        port=int(sys.argv[2]),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
'''

WRK_SCRIPT = """\
local devices = {
%(devices)s
}
local threads = {}

setup = function(thread)
  table.insert(threads, thread)
end

init = function(args)
  reqs = {}
  for k, d in ipairs(devices) do
    reqs[k] = wrk.format("POST", "/v1/checkin", {
      ["Content-Type"] = "application/json",
      ["Authorization"] = "Bearer " .. d[2],
      ["X-Fedfleet-Device"] = d[1],
    }, d[3])
  end
  i = math.random(#reqs)
  non2xx, reconnect, selected = 0, 0, 0
end

request = function()
  i = i %% #reqs + 1
  return reqs[i]
end

response = function(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  elseif string.find(body, '"outcome":"reconnect"', 1, true) then
    reconnect = reconnect + 1
  elseif string.find(body, '"outcome":"selected"', 1, true) then
    selected = selected + 1
  end
end

done = function(summary, latency, requests)
  local n, r, s = 0, 0, 0
  for _, t in ipairs(threads) do
    n, r, s = n + t:get("non2xx"), r + t:get("reconnect"), s + t:get("selected")
  end
  local e = summary.errors
  io.write(string.format(
    '\\nRESULT {"requests":%%d,"duration_us":%%d,"non2xx":%%d,"reconnect":%%d,' ..
    '"selected":%%d,"socket_errors":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, n, r, s,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def manifest(*, short_rounds: bool) -> dict[str, Any]:
    """A round of 10 against a population of 100,000: nearly every check-in is not needed."""
    rounds: dict[str, Any] = {"total": 1_000_000, "goalCount": 10}
    if short_rounds:  # selected devices never report here: abandon fast, open the next round
        rounds.update(selectionTimeoutSeconds=2.0, reportingTimeoutSeconds=2.0)
    return {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": JOB},
        "spec": {
            "population": POPULATION,
            "model": {"kind": "softmax", "inputs": 64, "classes": 10},
            "rounds": rounds,
            "fleet": {"devices": 100_000, "dataset": "digits", "shardsPerDevice": 0},
            "eligibility": {
                "requireCharging": True,
                "requireUnmetered": True,
                "requireIdle": True,
                "minExamples": 1,
            },
        },
    }


def body(device_id: str) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "population": POPULATION,
        "charging": True,
        "unmetered": True,
        "idle": True,
        "num_examples": 14,
    }


def pin(core: int) -> Callable[[], None]:
    def preexec() -> None:
        os.sched_setaffinity(0, {core})

    return preexec


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


@dataclass
class Service:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n" + "\n".join(tail))


@dataclass
class Run:
    variant: str
    target: str
    repeat: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    cpu_pct: float
    reconnect: int
    selected: int
    problems: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    manifest: Path
    secret_file: Path
    services: list[Service] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], core: int, port: int) -> Service:
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("ab")
        self.logs.append(log)
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=pin(core),
        )
        svc = Service(name, port, proc, log_path)
        self.services.append(svc)
        return svc

    def fedfleet(self, role: str, actor_id: str, core: int, store: str) -> Service:
        port = free_port(HOST)
        argv = [sys.executable, "-m", "fedfleet.cli", role, "--manifest", str(self.manifest)]
        argv += ["--store", store, "--secret-file", str(self.secret_file), "--id", actor_id]
        argv += ["--host", HOST, "--port", str(port)]
        return self.spawn(actor_id, argv, core, port)

    def stop(self, svc: Service) -> None:
        if svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGTERM)
            try:
                svc.proc.wait(15)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait()

    def stop_all(self) -> None:
        for svc in reversed(self.services):
            self.stop(svc)
        for log in self.logs:
            log.close()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=5).text
    out: dict[str, float] = {}
    for m in re.finditer(r'^fedfleet_checkins_total\{outcome="(\w+)"\} (\S+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def wrk(url: str, script: Path, args: argparse.Namespace, seconds: float) -> dict[str, int]:
    argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{seconds:g}s", "--timeout", "5s"]
    argv += ["-s", str(script), url + "/v1/checkin"]
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=pin(args.load_core))
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, int] = json.loads(line.removeprefix("RESULT "))
            return result
    raise RuntimeError(f"wrk exited {done.returncode}: {done.stdout[-800:]} {done.stderr[-800:]}")


def measure(
    variant: str,
    target: str,
    repeat: int,
    svc: Service,
    script: Path,
    args: argparse.Namespace,
) -> Run:
    svc.check_alive()
    wrk(svc.url, script, args, args.warmup)
    before = metrics(svc.url) if target == "fedfleet" else {}
    cpu0 = cpu_seconds(svc.proc.pid)
    r = wrk(svc.url, script, args, args.duration)
    cpu = cpu_seconds(svc.proc.pid) - cpu0
    seconds = r["duration_us"] / 1e6
    run = Run(
        variant,
        target,
        repeat,
        r["requests"],
        seconds,
        r["p50_us"] / 1e3,
        r["p99_us"] / 1e3,
        r["non2xx"],
        r["socket_errors"],
        100.0 * cpu / seconds,
        r["reconnect"],
        r["selected"],
    )
    if run.non2xx or run.socket_errors:
        run.problems.append(f"{run.non2xx} non-2xx, {run.socket_errors} socket errors")
    if run.reconnect + run.selected != run.requests:
        run.problems.append(f"{run.requests - run.reconnect - run.selected} odd bodies")
    if target == "fedfleet":  # the selector's own count of its answers
        after = metrics(svc.url)
        delta = {k: int(after.get(k, 0) - before.get(k, 0)) for k in after}
        if delta.get("reconnect", 0) + delta.get("selected", 0) < run.requests:
            run.problems.append(f"selector counted {delta}")
        if delta.get("unavailable"):
            run.problems.append(f"{delta['unavailable']} store-unavailable answers")
    return run


def lua_devices(keys: JobKeys, n: int) -> str:
    rows = []
    for i in range(n):
        device_id = f"dev-{i:06d}"
        text = json.dumps(body(device_id), separators=(",", ":"))
        rows.append(f'  {{"{device_id}", "{keys.device_token(device_id)}", {json.dumps(text)}}},')
    return "\n".join(rows)


def probe(url: str, keys: JobKeys, device_id: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/checkin",
        json=body(device_id),
        headers={
            "Authorization": f"Bearer {keys.device_token(device_id)}",
            "X-Fedfleet-Device": device_id,
        },
        timeout=5,
    )


def print_runs(runs: list[Run]) -> None:
    print(
        f"{'variant':<10} {'target':<9} {'run':>3} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'non-2xx':>7} {'cpu %':>5} {'reconnect':>9} {'selected':>8}  check"
    )
    for r in runs:
        print(
            f"{r.variant:<10} {r.target:<9} {r.repeat:>3} {r.rps:>7.0f} {r.p50_ms:>7.2f} "
            f"{r.p99_ms:>7.2f} {r.non2xx:>7} {r.cpu_pct:>5.0f} {r.reconnect:>9} "
            f"{r.selected:>8}  {'; '.join(r.problems) or 'ok'}"
        )


def summarize(runs: list[Run]) -> None:
    print(
        f"\n{'variant':<10} {'fedfleet req/s':>14} {'bare req/s':>10} {'ratio':>6} "
        f"{'pairs':>10} {'per cpu-s':>9}  verdict"
    )
    for variant in dict.fromkeys(r.variant for r in runs):
        fed = [r for r in runs if r.variant == variant and r.target == "fedfleet"]
        bare = [r for r in runs if r.variant == variant and r.target == "bare"]

        def rate(rs: list[Run]) -> float:
            return sum(r.requests for r in rs) / sum(r.seconds for r in rs)

        def per_cpu(rs: list[Run]) -> float:
            return sum(r.requests for r in rs) / sum(r.cpu_pct * r.seconds / 100 for r in rs)

        ratio = rate(fed) / rate(bare)
        cpu_ratio = per_cpu(fed) / per_cpu(bare)
        pairs = [f.rps / b.rps for f, b in zip(fed, bare, strict=True)]
        shared = min(r.cpu_pct for r in fed + bare) < SHARED_CPU_PCT
        judged = cpu_ratio if shared else ratio
        verdict = "PASS" if judged >= TARGET_RATIO else "MISS"
        verdict += f" on {'per cpu-s (server core shared)' if shared else 'ratio'}"
        print(
            f"{variant:<10} {rate(fed):>14.0f} {rate(bare):>10.0f} {ratio:>6.2f} "
            f"{f'{min(pairs):.2f}-{max(pairs):.2f}':>10} {cpu_ratio:>9.2f}  "
            f"{verdict}, target >= {TARGET_RATIO:.2f}"
        )


def run_variant(
    bench: Bench,
    variant: str,
    selector: Service,
    bare: Service,
    keys: JobKeys,
    script: Path,
) -> list[Run]:
    args = bench.args
    want = "selected" if variant == "selecting" else "reconnect"
    seen: dict[str, Any] = {}

    def answered() -> bool:
        r = probe(selector.url, keys, f"probe-{variant}-{time.monotonic_ns()}")
        seen.update(status=r.status_code, body=r.json())
        return r.status_code == 200 and r.json().get("outcome") == want

    wait_until(answered, 60, f"a {want} answer from the selector")
    print(f"[{variant}] fedfleet sample: {seen['status']} {json.dumps(seen['body'])}")
    r = probe(bare.url, keys, "dev-000000")
    print(f"[{variant}] bare sample:     {r.status_code} {r.text}")
    if r.status_code != 200:
        raise RuntimeError("the bare endpoint does not answer 200")
    runs = []
    for repeat in range(1, args.repeats + 1):
        for target, svc in (("fedfleet", selector), ("bare", bare)):
            run = measure(variant, target, repeat, svc, script, args)
            print(f"[{variant}] {target} run {repeat}: {run.rps:.0f} req/s", flush=True)
            runs.append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4, help="fedfleet/bare alternations")
    parser.add_argument("--devices", type=int, default=1000, help="device ids cycled through")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument(
        "--variants", default="reconnect,selecting", help="comma list: reconnect,selecting"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk (Debian package wrk)", file=sys.stderr)
        return
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in ("reconnect", "selecting") for v in variants):
        parser.error(f"unknown variant in {args.variants!r}")

    os.sched_setaffinity(0, {args.load_core})
    load_start = os.getloadavg()
    print(
        f"# check-in throughput, {dt.datetime.now():%Y-%m-%d %H:%M}, Python "
        f"{platform.python_version()}, {os.cpu_count()} cores, load average "
        f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at start"
    )
    print(
        f"# servers on core {args.server_core}; wrk -t1 -c{args.connections} on core "
        f"{args.load_core}; {args.warmup:g} s warm-up + {args.duration:g} s measured per run; "
        f"{args.devices} device ids"
    )
    workdir = Path(tempfile.mkdtemp(prefix="fedfleet-bench-checkin-"))
    bench = Bench(args, workdir, workdir / "fljob.yaml", workdir / "job-secret")
    redis = RedisProcess(workdir / "redis")
    runs: list[Run] = []
    try:
        redis.start()
        assert redis.proc is not None
        os.sched_setaffinity(redis.proc.pid, {args.load_core})
        secret = new_secret()
        keys = JobKeys.from_secret(secret)
        bench.secret_file.write_text(secret.hex())
        bench.secret_file.chmod(0o600)
        job = parse_manifest(manifest(short_rounds=True))
        bench.manifest.write_text(manifest_yaml(job))
        (workdir / "bare_app.py").write_text(BARE_APP)
        script = workdir / "checkin.lua"
        script.write_text(WRK_SCRIPT % {"devices": lua_devices(keys, args.devices)})

        selector = bench.fedfleet("selector", "selector-0", args.server_core, redis.url)
        bare_port = free_port(HOST)
        bare_argv = [sys.executable, str(workdir / "bare_app.py"), HOST, str(bare_port)]
        bare = bench.spawn("bare", bare_argv, args.server_core, bare_port)

        def ready(svc: Service, path: str) -> Callable[[], bool]:
            def check() -> bool:
                svc.check_alive()
                return httpx.get(svc.url + path, timeout=1).status_code == 200

            return check

        wait_until(ready(selector, "/readyz"), 60, "selector")
        wait_until(ready(bare, "/openapi.json"), 60, "bare app")

        for variant in variants:
            if variant == "selecting":
                coord = bench.fedfleet("coordinator", "coordinator-0", args.load_core, redis.url)
                agg = bench.fedfleet("aggregator", "aggregator-0", args.load_core, redis.url)
                wait_until(ready(coord, "/healthz"), 60, "coordinator")
                wait_until(ready(agg, "/readyz"), 60, "aggregator")
            runs += run_variant(bench, variant, selector, bare, keys, script)
    except Exception as exc:
        print(f"error: {exc!r}", file=sys.stderr)
        for svc in bench.services:
            if svc.proc.poll() is not None:
                print(svc.log_path.read_text(errors="replace")[-2000:], file=sys.stderr)
    finally:
        bench.stop_all()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    load_end = os.getloadavg()
    print()
    if runs:
        print_runs(runs)
        summarize(runs)
    print(
        f"\nload average {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at end\n"
        "ratio: fedfleet req/s / bare req/s over all runs; pairs: the same ratio for each "
        "alternation;\nper cpu-s: the ratio of requests per CPU-second of the server process, "
        "the verdict's measure\nwhen a run's server had under "
        f"{SHARED_CPU_PCT:.0f} % of its core (another process shared it)."
    )


if __name__ == "__main__":
    main()
