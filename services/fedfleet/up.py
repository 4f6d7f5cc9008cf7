"""``fedfleet up``: run a job through the deployed shape on this machine.

Starts a :class:`~fedfleet.local.LocalDeployment` (redis-server unless a URL is given, a
coordinator and its standby, selectors, aggregators — each its own uvicorn process), drives it
with the HTTP simulated fleet, and follows the job through the store's attempt history, so
progress, the report and the final model are the same as ``fedfleet run``'s.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from fedfleet.core.roles import JobPhase
from fedfleet.core.spec import FLJob
from fedfleet.local import LocalDeployment
from fedfleet.results import JobResult, ProgressSink, RoundRecord

__all__ = ["UpOptions", "follow", "record_from_attempt", "run_up"]


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
    timeout: float = 3600.0


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
    )


async def follow(
    deployment: LocalDeployment,
    result: JobResult,
    progress: ProgressSink | None,
    *,
    timeout: float,
    poll: float = 0.2,
) -> bool:
    """Turn the store's attempt history into progress until the job ends; True if it did."""
    store, name = deployment.store, deployment.job.key
    seen, last = 0, time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = await asyncio.to_thread(store.attempts, name, seen)
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
        state = await asyncio.to_thread(store.job_state, name)
        if state.get("phase") in (JobPhase.succeeded.value, JobPhase.failed.value) and not fresh:
            return True
        await asyncio.sleep(poll)
    return False


def run_up(
    job: FLJob, progress: ProgressSink | None = None, options: UpOptions | None = None
) -> JobResult:
    from fedfleet.device.http_fleet import HttpFleet

    opts = options or UpOptions()
    result = JobResult(job=job.name)
    wall0 = time.perf_counter()
    with LocalDeployment(
        job,
        store_url=opts.store_url,
        selectors=opts.selectors,
        aggregators=opts.aggregators,
        tick_seconds=opts.tick_seconds,
        lease_ttl=opts.lease_ttl,
    ) as deployment:

        async def main() -> bool:
            fleet = HttpFleet(
                job, deployment.urls("selector"), deployment.keys, time_scale=opts.time_scale
            )
            done = asyncio.Event()
            fleet_task = asyncio.create_task(fleet.run(until=done))
            try:
                return await follow(deployment, result, progress, timeout=opts.timeout)
            finally:
                done.set()
                await fleet_task

        finished = asyncio.run(main())
        store = deployment.store
        state = store.job_state(job.key)
        history = store.metrics(job.key)
        checkpoint = store.checkpoint(job.key)
        result.model_version = store.model_version(job.key)
    result.wall_seconds = time.perf_counter() - wall0
    result.sim_seconds = result.wall_seconds
    result.succeeded = finished and state.get("phase") == JobPhase.succeeded.value
    result.reason = str(state.get("reason", "" if finished else "timeout"))
    if not result.succeeded:
        result.error = str(state.get("last_error", ""))
    if history:
        result.final_accuracy = float(history[-1]["accuracy"])
        result.final_loss = float(history[-1]["loss"])
    if checkpoint is not None:
        result.model_bytes = checkpoint.data
    return result
