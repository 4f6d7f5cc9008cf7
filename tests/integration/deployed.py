"""Run a job through real processes (redis-server, uvicorn actors) and a real HTTP fleet,
optionally injecting faults; shared by the integration and chaos tiers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.device.http_fleet import HttpFleet
from fedfleet.local import LocalDeployment
from fedfleet.results import JobResult
from fedfleet.up import UpOptions, follow


def small_job(name: str = "it", **overrides: Any) -> FLJob:
    spec: dict[str, Any] = {
        "population": "it",
        "model": {"kind": "softmax", "inputs": 64, "classes": 10},
        "plan": {"localEpochs": 2, "batchSize": 10, "learningRate": 0.1},
        "rounds": {
            "total": 12,
            "goalCount": 8,
            "selectionTimeoutSeconds": 8,
            "reportingTimeoutSeconds": 8,
        },
        "eligibility": {"requireCharging": False, "requireUnmetered": False, "requireIdle": False},
        "fleet": {
            "devices": 60,
            "dataset": "digits",
            "shardsPerDevice": 0,
            "seed": 4,
            "dropoutRate": 0.05,
            "trainSeconds": 20,
        },
        "actors": {"selectors": 2, "devicesPerAggregator": 6},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


@dataclass
class Fault:
    """Do ``action(deployment)`` once ``when(deployment)`` holds (checked every 0.1 s)."""

    when: Callable[[LocalDeployment], bool]
    action: Callable[[LocalDeployment], None]
    fired_at: float | None = None


@dataclass
class Outcome:
    result: JobResult
    finished: bool
    attempts: list[dict[str, Any]] = field(default_factory=list)
    versions_seen: list[int] = field(default_factory=list)
    """Model versions read from the store every 0.1 s during the run (must never decrease)."""
    fleet_stats: Any = None


def run_deployed(
    job: FLJob,
    *,
    faults: list[Fault] | None = None,
    timeout: float = 240.0,
    time_scale: float = 0.01,
    **deployment: Any,
) -> Outcome:
    faults = faults or []
    result = JobResult(job=job.name)
    versions: list[int] = []
    with LocalDeployment(job, tick_seconds=0.1, lease_ttl=2.0, **deployment) as d:

        async def watch(stop: asyncio.Event) -> None:
            while not stop.is_set():
                try:
                    versions.append(await asyncio.to_thread(d.store.model_version, job.name))
                except Exception:
                    pass  # the store may be down on purpose
                for f in faults:
                    if f.fired_at is None and f.when(d):
                        f.action(d)
                        f.fired_at = time.monotonic()
                await asyncio.sleep(0.1)

        async def main() -> tuple[bool, Any]:
            # Rest 1-3 real-time rounds after reporting, as fedfleet up does (see UpOptions).
            fleet = HttpFleet(
                job,
                d.urls("selector"),
                d.keys,
                time_scale=time_scale,
                rest_seconds=UpOptions().rest_seconds,
                rest_rounds=UpOptions().rest_rounds,
            )
            stop = asyncio.Event()
            tasks = [asyncio.create_task(fleet.run(until=stop)), asyncio.create_task(watch(stop))]
            try:
                finished = await follow(d, result, None, timeout=timeout)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            return finished, fleet.stats

        finished, stats = asyncio.run(main())
        attempts = d.store.attempts(job.name)
        result.model_version = d.store.model_version(job.name)
        history = d.store.metrics(job.name)
        if history:
            result.final_accuracy = float(history[-1]["accuracy"])
        if not finished:
            for actor in d.actors:
                print(f"--- {actor}\n{d.log_tail(actor)}")
    return Outcome(result, finished, attempts, versions, stats)


def version_reached(n: int) -> Callable[[LocalDeployment], bool]:
    def check(d: LocalDeployment) -> bool:
        try:
            return d.store.model_version(d.job.name) >= n
        except Exception:
            return False

    return check


def reporting_after(n: int) -> Callable[[LocalDeployment], bool]:
    """True while an attempt is reporting and at least n versions were committed: mid-round."""

    def check(d: LocalDeployment) -> bool:
        try:
            if d.store.model_version(d.job.name) < n:
                return False
            return any(r.phase.value == "reporting" for r in d.store.rounds(d.job.name))
        except Exception:
            return False

    return check
