"""``fedfleet up``: run a job through the deployed shape on this machine.

Starts a :class:`~fedfleet.local.LocalDeployment` (redis-server unless a URL is given, a
coordinator and its standby, selectors, aggregators — each its own uvicorn process), drives it
with the HTTP simulated fleet, and follows the job through the store's attempt history, so
progress, the report and the final model are the same as ``fedfleet run``'s.

A Redis outage does not end the command: every read of the store is retried with exponential
backoff (said once per outage on stderr, and again when the store is back), and a private
redis-server that died is started again from its append-only file. Only an outage longer than
the job's timeout ends it, with a one-line error.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from fedfleet.core.roles import JobPhase
from fedfleet.core.spec import FLJob
from fedfleet.endpoint import EndpointError
from fedfleet.local import LocalDeployment
from fedfleet.results import (
    JobResult,
    ProgressSink,
    RoundRecord,
    best_model_of,
    device_metrics,
    numeric_metrics,
)
from fedfleet.store.base import StoreUnavailable
from fedfleet.store.history import checkpoint_bytes

__all__ = ["StoreWatch", "UpOptions", "follow", "record_from_attempt", "run_up"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UpOptions:
    store_url: str | None = None
    selectors: int = 2
    aggregators: int = 2
    tick_seconds: float = 0.1
    lease_ttl: float = 3.0
    time_scale: float = 0.01
    """Multiplies the simulated devices' training time (fleet.trainSeconds) in real time."""
    rest_seconds: tuple[float, float] = (150.0, 450.0)
    """Simulated rest of a device after it reported (scaled by time_scale, so 1.5-4.5 s at
    0.01). Real-time rounds last ~1.5 s whatever the scale (ticks, long polls), so this keeps
    a device out for 1-3 rounds as in the embedded simulator; shorter rests let the same
    devices win every concentrated selection and skew a non-IID model."""
    rest_rounds: tuple[float, float] = (1.0, 3.0)
    """The same rest counted in rounds the fleet measures (the longer of the two wins): on a
    loaded machine rounds stretch to seconds, and a rest fixed in seconds would then let the
    devices that just reported win the next selections (a cluster run once reached only 0.86
    in 50 rounds that way, against 0.88 by round 12 when rounds were short)."""
    timeout: float = 3600.0
    restart_redis: bool = True
    """Start the private redis-server again if it dies (it reloads its append-only file)."""
    no_fleet: bool = False
    """Start only the server side: real devices (``fedfleet device run``) do the training."""
    state_dir: Path | None = None
    """With ``no_fleet``: the population endpoint kept across jobs (:mod:`fedfleet.endpoint`)."""
    listen: tuple[str, int] | None = None
    """With ``state_dir``: the selector's host and port (the last job's, else a free one)."""


class StoreWatch:
    """Calls the store until it answers: exponential backoff from ``first`` to ``longest``
    seconds, one line on ``out`` when an outage starts and one when it ends, and the private
    redis-server restarted if it died (``restart_redis``)."""

    def __init__(
        self,
        deployment: LocalDeployment,
        *,
        restart_redis: bool = True,
        out: TextIO | None = None,
        first: float = 0.2,
        longest: float = 5.0,
    ) -> None:
        self.deployment = deployment
        self.restart_redis = restart_redis
        self.out = out
        self.first = first
        self.longest = longest
        self.outages = 0
        self.restarts = 0
        self._down_since: float | None = None

    def _say(self, line: str) -> None:
        print(f"fedfleet up: {line}", file=self.out or sys.stderr, flush=True)

    async def call(self, fn: Callable[..., T], *args: Any, deadline: float) -> T:
        delay = self.first
        while True:
            try:
                value = await asyncio.to_thread(fn, *args)
            except StoreUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self.outages += 1
                    self._say(f"store unavailable ({exc}); retrying with backoff")
                await asyncio.to_thread(self._revive)
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.longest)
                continue
            if self._down_since is not None:
                self._say(f"store reachable again after {time.monotonic() - self._down_since:.1f}s")
                self._down_since = None
            return value

    def _revive(self) -> None:
        redis = self.deployment.redis
        if not self.restart_redis or redis is None or redis.running:
            return
        status = redis.exit_status
        self._say(
            f"redis-server exited (status {status}); starting it again from its append-only file"
        )
        redis.start()
        self.restarts += 1


def record_from_attempt(a: dict[str, Any], seconds: float) -> RoundRecord:
    metrics = a.get("metrics") or {}
    acc, loss = metrics.get("accuracy"), metrics.get("loss")
    return RoundRecord(
        round=int(a["round"]),
        selected=int(a["selected"]),
        reported=int(a["reported"]),
        dropped=int(a["dropped"]),
        abandoned=bool(a["abandoned"]),
        accuracy=None if acc is None else float(acc),
        loss=None if loss is None else float(loss),
        seconds=seconds,
        sim_seconds=float(a["ended_at"]) - float(a["opened_at"]),
        model_version=int(a["model_version"]),
        reason=str(a.get("reason", "")),
        device_metrics={} if a["abandoned"] else device_metrics(metrics),
    )


async def follow(
    deployment: LocalDeployment,
    result: JobResult,
    progress: ProgressSink | None,
    *,
    timeout: float,
    poll: float = 0.2,
    watch: StoreWatch | None = None,
) -> bool:
    """Turn the store's attempt history into progress until the job ends; True if it did.

    Store outages are ridden out through ``watch`` (a default :class:`StoreWatch`)."""
    store, name = deployment.store, deployment.job.key
    watch = watch or StoreWatch(deployment)
    seen, last = 0, time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The job's state first, then its attempts: the coordinator records an attempt before
        # it writes the job's end, so once the end is seen, the attempts read after it are
        # complete (read the other way round, the last attempt could land in between).
        state = await watch.call(store.job_state, name, deadline=deadline)
        fresh = await watch.call(store.attempts, name, seen, deadline=deadline)
        for a in fresh:
            now = time.perf_counter()
            seen += 1
            if a.get("reason") in ("job-finished", "job-failed"):
                continue
            record = record_from_attempt(a, now - last)
            last = now
            result.rounds.append(record)
            if progress is not None:
                progress.round_ended(record)
        if state.get("phase") in (JobPhase.succeeded.value, JobPhase.failed.value) and not fresh:
            return True
        await asyncio.sleep(poll)
    return False


def _deployment(
    job: FLJob, opts: UpOptions, stack: contextlib.ExitStack
) -> tuple[LocalDeployment, Callable[[], None]]:
    """The deployment ``opts`` asks for, and what to do once it serves: with a state
    directory, its store and population endpoint (the gateway), and ``endpoint.json`` written
    once the gateway listens (a device or a script waiting for the file finds the server up)."""
    if opts.state_dir is None:
        return LocalDeployment(
            job,
            store_url=opts.store_url,
            selectors=opts.selectors,
            aggregators=opts.aggregators,
            tick_seconds=opts.tick_seconds,
            lease_ttl=opts.lease_ttl,
        ), lambda: None
    from fedfleet.endpoint import load_or_create
    from fedfleet.redis_server import RedisServer
    from fedfleet.service.enrollment import enroll_token
    from fedfleet.store.factory import open_store

    endpoint = load_or_create(opts.state_dir, job.spec.population, opts.listen)
    store_url = opts.store_url
    if store_url is None:
        redis = RedisServer(endpoint.redis_dir)
        redis.start()
        stack.callback(redis.stop)
        store_url = redis.url
    store = open_store(store_url)
    try:
        phase = store.job_state(job.key).get("phase")
    finally:
        store.close()
    if phase in (JobPhase.succeeded.value, JobPhase.failed.value):
        raise EndpointError(
            f"job {job.name} already ended ({phase}) in {opts.state_dir}: give the new job "
            "another metadata.name, or use another --state-dir"
        )
    deployment = LocalDeployment(
        job,
        store_url=store_url,
        selectors=opts.selectors,  # behind the gateway: devices know only its URL
        aggregators=opts.aggregators,
        tick_seconds=opts.tick_seconds,
        lease_ttl=opts.lease_ttl,
        gateway_address=(endpoint.host, endpoint.port),
        population_secret=endpoint.secret,
    )
    token = enroll_token(endpoint.secret)

    def announce() -> None:
        path = endpoint.write(token)
        print(
            f"devices of population {job.spec.population!r} join at {endpoint.url}: {path}",
            file=sys.stderr,
            flush=True,
        )

    return deployment, announce


def run_up(
    job: FLJob, progress: ProgressSink | None = None, options: UpOptions | None = None
) -> JobResult:
    from fedfleet.device.http_fleet import HttpFleet

    opts = options or UpOptions()
    result = JobResult(job=job.name)
    wall0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        deployment, announce = _deployment(job, opts, stack)
        stack.enter_context(deployment)
        announce()
        watch = StoreWatch(deployment, restart_redis=opts.restart_redis)

        async def main() -> bool:
            if opts.no_fleet:
                return await follow(deployment, result, progress, timeout=opts.timeout, watch=watch)
            fleet = HttpFleet(
                job, deployment.urls("selector"), deployment.keys, time_scale=opts.time_scale
            )
            done = asyncio.Event()
            fleet_task = asyncio.create_task(fleet.run(until=done))
            try:
                return await follow(deployment, result, progress, timeout=opts.timeout, watch=watch)
            finally:
                done.set()
                await fleet_task

        finished = asyncio.run(main())
        store = deployment.store

        async def final() -> tuple[Any, ...]:
            until = time.monotonic() + max(60.0, 4 * opts.lease_ttl)
            return (
                await watch.call(store.job_state, job.key, deadline=until),
                await watch.call(store.metrics, job.key, deadline=until),
                await watch.call(store.checkpoint, job.key, deadline=until),
                await watch.call(store.model_version, job.key, deadline=until),
            )

        state, history, checkpoint, result.model_version = asyncio.run(final())
        if checkpoint is not None:
            # The pointer names the model's bytes in the model storage (in this deployment's
            # Redis by default): read them while the deployment still runs.
            result.model_bytes = checkpoint_bytes(store, checkpoint)
    for actor_id, status, log_path in deployment.failures:
        print(f"actor {actor_id} exited with status {status}; its log: {log_path}", file=sys.stderr)
    result.wall_seconds = time.perf_counter() - wall0
    result.sim_seconds = result.wall_seconds
    result.succeeded = finished and state.get("phase") == JobPhase.succeeded.value
    result.reason = str(state.get("reason", "" if finished else "timeout"))
    if not result.succeeded:
        result.error = str(state.get("last_error", ""))
    if history:
        result.final_metrics = numeric_metrics(history[-1])
        result.final_accuracy = result.final_metrics.get("accuracy")
        result.final_loss = result.final_metrics.get("loss")
    result.best_model = best_model_of(history, job.spec.checkpoints)
    return result
