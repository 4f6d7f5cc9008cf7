"""A simulated fleet that drives a *deployed* fedfleet over HTTP, in real time.

The embedded runner's :class:`~fedfleet.device.fleet.SimulatedFleet` calls selectors in-process
on simulated time; this one is the same population — the same shards of the same dataset
(:func:`~fedfleet.device.datasets.prepare`), the same daily availability curve
(:func:`~fedfleet.device.fleet.availability`), the same drop-out model and the same
:class:`~fedfleet.device.runtime.FLRuntime` — talking to Selector services through
:class:`~fedfleet.device.http_transport.SelectorClient` with wall-clock time. It is what
``fedfleet simulate`` runs against ``fedfleet up`` or a cluster, and what the integration tests
run against real uvicorn servers.

How it stays fast with thousands of devices in one process:

* an idle device is a timer in the event loop's own heap (``loop.call_at``), not a sleeping
  coroutine; when it is due it is queued, and a bounded pool of workers does the check-ins, so
  a burst of due devices never opens more connections than the pool allows;
* only a *selected* device becomes a coroutine of its own (it holds a long-poll, trains, and
  reports): that is bounded by the rounds' sizes, not by the population;
* training (numpy, CPU-bound) runs in a thread pool, so the event loop keeps serving the
  connections while devices compute.

Time: the server's reconnect windows are obeyed exactly as given (the runtime picks a time
inside each window). Everything the simulator invents itself — how long training takes
(``fleet.trainSeconds``), how long an ineligible device waits before it looks again, how long a
device rests after reporting, the spread of the first check-ins — is multiplied by
``time_scale``, so a test can run a job in seconds while the server behaves as in production.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from fedfleet.core.protocol import Assignment, Reconnect, ReportEnvelope
from fedfleet.core.secagg import SecAggError
from fedfleet.core.spec import FLJob
from fedfleet.device.datasets import DatasetSplit, prepare
from fedfleet.device.fleet import availability
from fedfleet.device.http_transport import (
    ProtocolError,
    Refused,
    SelectorClient,
    ServerBusy,
    TransportError,
    Unreachable,
    WeightsCache,
)
from fedfleet.device.runtime import (
    ArrayExamples,
    DeviceConditions,
    FLRuntime,
    SecureContribution,
    TaskAborted,
)
from fedfleet.device.secure import SecureSession
from fedfleet.device.userdata import take
from fedfleet.service.keys import JobKeys

__all__ = ["HttpFleet", "HttpFleetStats", "RoundClock", "rest_delay"]

log = logging.getLogger("fedfleet.device.fleet")


@dataclass(slots=True)
class HttpFleetStats:
    """What the fleet did so far; every counter only grows."""

    checkins: int = 0
    """Check-in requests sent (including ones that failed to connect)."""
    selected: int = 0
    """Check-ins answered with a selection."""
    reconnects: int = 0
    """Check-ins answered with a reconnect window (pace steering)."""
    ineligible: int = 0
    """Wake-ups where the device was not eligible (not charging, busy, metered)."""
    configured: int = 0
    """Selected devices that received their plan and checkpoint."""
    released: int = 0
    """Selected devices sent away before they were configured (the round ended, 410/404)."""
    secagg_completed: int = 0
    """Secure aggregation sessions a device walked to the end (its unmasking shares sent)."""
    secagg_rerouted: int = 0
    """Secure aggregation steps another selector relayed because the device's own was down."""
    secagg_left: int = 0
    """Secure aggregation sessions a device left early: it dropped out on purpose, missed a
    phase (410), or refused a bad roster or share."""
    reported: int = 0
    """Reports accepted (202)."""
    aborted: int = 0
    """Tasks given up because the device lost eligibility mid-task (drop-outs)."""
    refused: dict[int, int] = field(default_factory=dict)
    """Refusals by HTTP status (409 stragglers, 401 bad tokens, ...)."""
    connection_errors: int = 0
    """Requests that could not reach a selector."""
    busy: int = 0
    """503 answers (the server's store or an aggregator was down)."""
    protocol_errors: int = 0
    """Answers the device did not understand."""

    def refuse(self, status: int) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1

    def copy(self) -> HttpFleetStats:
        return replace(self, refused=dict(self.refused))

    def as_dict(self) -> dict[str, int | dict[int, int]]:
        out: dict[str, int | dict[int, int]] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, dict) else int(value)
        return out

    def line(self) -> str:
        """One human-readable line (``fedfleet simulate`` prints it every few seconds)."""
        refused = ",".join(f"{k}:{v}" for k, v in sorted(self.refused.items())) or "0"
        return (
            f"checkins={self.checkins} selected={self.selected} configured={self.configured} "
            f"reported={self.reported} aborted={self.aborted} released={self.released} "
            f"refused={refused} busy503={self.busy} conn_errors={self.connection_errors} "
            f"reconnects={self.reconnects} ineligible={self.ineligible}"
        )


class _Selector:
    __slots__ = ("client", "down_until")

    def __init__(self, client: SelectorClient) -> None:
        self.client = client
        self.down_until = 0.0
        """``time.monotonic()`` before which this selector is skipped (it failed to connect)."""


class _Device:
    __slots__ = ("assignment", "busy", "handle", "runtime", "selector", "token")

    def __init__(self, runtime: FLRuntime, token: str) -> None:
        self.runtime = runtime
        self.token = token
        self.handle: asyncio.TimerHandle | None = None
        self.busy = False
        """Queued or working: a due timer for a busy device is ignored."""
        self.assignment: Assignment | None = None
        """Held while selected and not yet reported or aborted."""
        self.selector: _Selector | None = None

    @property
    def device_id(self) -> str:
        return self.runtime.device_id


class RoundClock:
    """The real time between rounds, from the first task of each new round a fleet sees
    (smoothed; NaN until two rounds were seen)."""

    __slots__ = ("_at", "_seen", "interval")

    def __init__(self) -> None:
        self._seen: deque[str] = deque(maxlen=16)
        """Recent round keys: a late task of an earlier round does not count as a new one."""
        self._at = math.nan
        self.interval = math.nan

    def observe(self, round_key: str, now: float) -> None:
        if round_key in self._seen:
            return
        if not math.isnan(self._at):
            gap = now - self._at
            self.interval = gap if math.isnan(self.interval) else 0.7 * self.interval + 0.3 * gap
        self._seen.append(round_key)
        self._at = now


def rest_delay(seconds: float, rounds: float | None, interval: float) -> float:
    """A reporting device's rest: ``seconds``, or ``rounds`` round intervals if that is
    longer and the interval is known."""
    if rounds is None or math.isnan(interval):
        return seconds
    return max(seconds, rounds * interval)


class HttpFleet:
    """Simulated devices of ``job`` checking in at ``selectors`` (base URLs) over HTTP.

    ``keys`` stands in for enrollment: each device's bearer token is
    ``keys.device_token(device_id)``. ``devices`` picks which of the ``fleet.devices`` devices
    this process simulates (all by default; give disjoint ranges to several processes to spread
    a large fleet).

    Knobs: ``concurrency`` bounds concurrent check-ins (the worker pool, and each selector's
    pool for short requests); ``max_long_polls`` bounds held plan polls per selector (keep it
    under the process's open-file limit); ``train_workers`` is the training thread pool;
    ``start_spread``, ``recheck_seconds``, ``rest_seconds`` and ``retry_seconds`` are the
    simulator's own delays (scaled by ``time_scale``); ``rest_rounds`` (if given) makes a
    device that reported rest at least that many rounds too, in rounds as this fleet measures
    them (the interval between new rounds' first tasks), so a server slowed down (a loaded
    machine) does not see the same few devices every round; ``max_task_wait`` makes a selected
    device give up waiting for its plan; ``availability_offset`` is the time of the simulated
    day at start (0: the curve's peak, as in embedded runs).
    """

    def __init__(
        self,
        job: FLJob,
        selectors: Sequence[str],
        keys: JobKeys,
        *,
        time_scale: float = 1.0,
        data: DatasetSplit | None = None,
        devices: Sequence[int] | None = None,
        id_prefix: str = "dev",
        concurrency: int = 64,
        train_workers: int | None = None,
        start_spread: float = 30.0,
        recheck_seconds: float = 60.0,
        rest_seconds: tuple[float, float] = (30.0, 90.0),
        rest_rounds: tuple[float, float] | None = None,
        retry_seconds: tuple[float, float] = (5.0, 15.0),
        selector_backoff: float = 5.0,
        report_attempts: int = 3,
        max_task_wait: float | None = None,
        availability_offset: float = 0.0,
        client_timeout: float = 30.0,
        poll_wait: float = 10.0,
        max_long_polls: int = 512,
        secagg_poll_seconds: float = 0.2,
        secagg_give_up_seconds: float = 600.0,
    ) -> None:
        if not selectors:
            raise ValueError("at least one selector URL is needed")
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise ValueError(f"time_scale must be a positive number, got {time_scale}")
        self.job = job
        self.spec = job.spec
        self.fleet = job.spec.fleet
        self.selector_urls = [u.rstrip("/") for u in selectors]
        self.time_scale = time_scale
        self.concurrency = max(1, concurrency)
        self.train_workers = train_workers or min(8, (os.cpu_count() or 1) + 1)
        self.start_spread = start_spread
        self.recheck_seconds = recheck_seconds
        self.rest_seconds = rest_seconds
        self.rest_rounds = rest_rounds
        self.rounds = RoundClock()
        self.retry_seconds = retry_seconds
        self.selector_backoff = selector_backoff
        self.report_attempts = max(1, report_attempts)
        self.max_task_wait = max_task_wait
        self.availability_offset = availability_offset
        self.client_timeout = client_timeout
        self.poll_wait = poll_wait
        self.max_long_polls = max_long_polls
        self.secagg_poll_seconds = secagg_poll_seconds
        self.secagg_give_up_seconds = secagg_give_up_seconds
        self.stats = HttpFleetStats()
        self.weights = WeightsCache()
        self.rng = np.random.default_rng(self.fleet.seed + 1)
        self._pick = random.Random(self.fleet.seed + 2)
        split = data if data is not None else prepare(self.fleet, job.spec.evaluation)
        indices = range(len(split.shards)) if devices is None else devices
        self.devices: list[_Device] = []
        for i in indices:
            if not 0 <= i < len(split.shards):
                raise ValueError(f"device index {i} outside 0..{len(split.shards) - 1}")
            idx = split.shards[i]
            runtime = FLRuntime(
                f"{id_prefix}-{i:06d}",
                self.spec.population,
                ArrayExamples(take(split.train, idx)),
                policy=self.spec.eligibility,
                rng=np.random.default_rng([self.fleet.seed, i]),
            )
            self.devices.append(_Device(runtime, keys.device_token(runtime.device_id)))
        self._selectors: list[_Selector] = []
        self._queue: asyncio.Queue[_Device] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop: asyncio.Event | None = None
        self._running = False
        self._started_wall = 0.0
        self._warned: set[int] = set()
        self.compute_seconds: dict[str, float] = {}
        """Per round key, the slowest device's own time from receiving its task to starting
        its upload (training plus the simulated duration): what a round cannot go below."""

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask a running :meth:`run` to return (safe to call from any thread)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)

    async def run(
        self,
        until: asyncio.Event | float | None = None,
        *,
        stop_when: Callable[[], bool] | None = None,
        check_every: float = 0.2,
    ) -> HttpFleetStats:
        """Simulate until ``until`` (an event that gets set, or a ``time.monotonic()``
        deadline), until ``stop_when()`` holds (checked every ``check_every`` seconds), or
        until :meth:`stop`; returns the stats. Devices still holding a task are aborted
        (best effort) on the way out, so their selectors stop waiting for them.
        """
        if self._running:
            raise RuntimeError("this fleet is already running")
        self._running = True
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(self.train_workers, thread_name_prefix="fleet-train")
        self._selectors = [
            _Selector(
                SelectorClient(
                    url,
                    timeout=self.client_timeout,
                    max_connections=self.concurrency + 32,
                    max_long_polls=self.max_long_polls,
                    poll_wait=self.poll_wait,
                    weights=self.weights,
                )
            )
            for url in self.selector_urls
        ]
        self._started_wall = time.time()
        workers = [
            loop.create_task(self._worker(), name=f"fleet-worker-{i}")
            for i in range(self.concurrency)
        ]
        try:
            spread = self.start_spread * self.time_scale
            now = time.time()
            for dev in self.devices:
                self._schedule(dev, now + self._pick.uniform(0.0, spread))
            await self._wait(until, stop_when, check_every)
        finally:
            for dev in self.devices:
                if dev.handle is not None:
                    dev.handle.cancel()
            for w in workers:
                w.cancel()
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await self._join(workers + tasks)
            await self._abort_in_flight()
            for s in self._selectors:
                try:
                    await asyncio.wait_for(s.client.aclose(), 10.0)
                except TimeoutError:
                    log.warning("stopping: closing the client of %s timed out", s.client.base_url)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._running = False
            self._loop = None
        return self.stats.copy()

    @staticmethod
    async def _join(tasks: list[asyncio.Task[None]], timeout: float = 30.0) -> None:
        """Wait for cancelled tasks to finish, a bounded time: a task that ignores its
        cancellation is named in the log, with where it is stuck, instead of hanging the stop."""
        if not tasks:
            return
        done, stuck = await asyncio.wait(tasks, timeout=timeout)
        for t in stuck:
            frames = "; ".join(
                f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in t.get_stack()
            )
            log.warning(
                "stopping: task %s still running after %.0f s at %s", t.get_name(), timeout, frames
            )
        for t in done:  # retrieve each outcome, as gather(return_exceptions=True) did
            if not t.cancelled() and t.exception() is not None:
                log.debug("task %s ended with %r", t.get_name(), t.exception())

    async def _wait(
        self,
        until: asyncio.Event | float | None,
        stop_when: Callable[[], bool] | None,
        check_every: float,
    ) -> None:
        assert self._stop is not None
        # Wake the moment the stop event (or ``until``, when it is one) is set: the caller is
        # waiting for the fleet to wind down (``fedfleet up`` ends after it), so polling them
        # every ``check_every`` seconds would add up to that much to every run's end.
        events = [self._stop] + ([until] if isinstance(until, asyncio.Event) else [])
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            while True:
                if stop_when is not None and stop_when():
                    return
                if any(e.is_set() for e in events):
                    return
                timeout = check_every
                if isinstance(until, int | float):
                    left = until - time.monotonic()
                    if left <= 0:
                        return
                    timeout = min(timeout, left)
                done, _ = await asyncio.wait(
                    waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    return
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _abort_in_flight(self, timeout: float = 3.0) -> None:
        holding = [d for d in self.devices if d.assignment is not None and d.selector is not None]
        if not holding:
            return

        async def one(dev: _Device) -> None:
            assert dev.assignment is not None and dev.selector is not None
            a, s = dev.assignment, dev.selector
            dev.assignment = dev.selector = None
            try:
                await s.client.abort(a.round_key, dev.device_id, a.ticket, "simulator-stopped")
            except TransportError:
                pass

        try:
            await asyncio.wait_for(
                asyncio.gather(*(one(d) for d in holding), return_exceptions=True), timeout
            )
        except TimeoutError:
            log.warning("stopping: %d in-flight aborts timed out", len(holding))

    # -- scheduling ----------------------------------------------------------------------------
    def _schedule(self, dev: _Device, when: float) -> None:
        """Wake ``dev`` at wall-clock time ``when`` (a timer in the loop's heap)."""
        loop = self._loop
        if loop is None:
            return
        dev.busy = False
        delay = max(0.0, when - time.time())
        dev.handle = loop.call_at(loop.time() + delay, self._due, dev)

    def _later(self, dev: _Device, low: float, high: float) -> None:
        """Wake ``dev`` after a simulator-invented delay (scaled by ``time_scale``)."""
        self._schedule(dev, time.time() + self._pick.uniform(low, high) * self.time_scale)

    def _retry(self, dev: _Device) -> None:
        """Back off after a failure; never below a second, whatever the time scale, so a fleet
        whose selectors are all down does not spin on connection attempts."""
        low, high = self.retry_seconds
        delay = max(1.0, self._pick.uniform(low, high) * self.time_scale)
        self._schedule(dev, time.time() + delay)

    def _due(self, dev: _Device) -> None:
        dev.handle = None
        if dev.busy or self._queue is None:
            return
        dev.busy = True
        self._queue.put_nowait(dev)

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            dev = await self._queue.get()
            try:
                await self._wake(dev)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("device %s: check-in failed unexpectedly", dev.device_id)
                self._retry(dev)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one device ----------------------------------------------------------------------------
    def _conditions(self, now: float) -> DeviceConditions:
        t = self.availability_offset + (now - self._started_wall)
        if self.rng.random() < availability(self.fleet, t):
            return DeviceConditions(True, True, True)
        which = int(self.rng.integers(3))
        return DeviceConditions(which != 0, which != 1, which != 2)

    def _candidates(self) -> list[_Selector]:
        """Selectors to try, in random order; ones that recently failed to connect go last."""
        mono = time.monotonic()
        up = [s for s in self._selectors if s.down_until <= mono]
        down = [s for s in self._selectors if s.down_until > mono]
        self._pick.shuffle(up)
        self._pick.shuffle(down)
        return up + down

    def _unreachable(self, sel: _Selector, exc: Exception) -> None:
        self.stats.connection_errors += 1
        if sel.down_until <= time.monotonic():
            log.info("selector %s unreachable: %s", sel.client.base_url, exc)
        sel.down_until = time.monotonic() + self.selector_backoff

    def _refused(self, exc: Refused, what: str) -> None:
        self.stats.refuse(exc.status)
        if exc.status not in self._warned and exc.status not in (409,):
            self._warned.add(exc.status)  # once per status: a wrong secret would flood the log
            log.warning("%s refused: %s", what, exc)

    async def _wake(self, dev: _Device) -> None:
        now = time.time()
        runtime = dev.runtime
        conditions = self._conditions(now)
        if not runtime.should_check_in(conditions, now):
            if now < runtime.next_checkin:
                self._schedule(dev, runtime.next_checkin)
            else:
                self.stats.ineligible += 1
                r = self.recheck_seconds
                self._later(dev, 0.5 * r, 1.5 * r)
            return
        msg = runtime.checkin(conditions, now)
        for sel in self._candidates():
            self.stats.checkins += 1
            try:
                answer = await sel.client.checkin(msg, dev.token)
            except Unreachable as exc:
                self._unreachable(sel, exc)
                continue
            except ServerBusy as exc:
                self.stats.busy += 1
                # No sooner than Retry-After; a little jitter so the herd does not come back
                # in one instant.
                wait = exc.retry_after * (1.0 + 0.2 * self._pick.random())
                self._schedule(dev, time.time() + wait)
                return
            except Refused as exc:
                self._refused(exc, f"check-in of {dev.device_id}")
                r = self.recheck_seconds
                self._later(dev, 0.5 * r, 1.5 * r)
                return
            except ProtocolError as exc:
                self.stats.protocol_errors += 1
                log.warning("check-in of %s: %s", dev.device_id, exc)
                self._retry(dev)
                return
            if isinstance(answer, Reconnect):
                self.stats.reconnects += 1
                self._schedule(dev, runtime.on_reconnect(answer))
                return
            self.stats.selected += 1
            dev.assignment, dev.selector = answer, sel
            self._spawn(self._participate(dev, sel, answer), f"task-{dev.device_id}")
            return
        self._retry(dev)  # no selector could be reached

    async def _participate(self, dev: _Device, sel: _Selector, assignment: Assignment) -> None:
        try:
            await self._task(dev, sel, assignment)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("device %s: task failed unexpectedly", dev.device_id)
            await self._give_up(dev, "device-error")
            self._retry(dev)

    async def _give_up(self, dev: _Device, reason: str) -> None:
        """Abort the held assignment (best effort) so the round stops counting on it."""
        a, s = dev.assignment, dev.selector
        dev.assignment = dev.selector = None
        if a is None or s is None:
            return
        try:
            await s.client.abort(a.round_key, dev.device_id, a.ticket, reason)
        except Unreachable as exc:
            self._unreachable(s, exc)
        except ServerBusy:
            self.stats.busy += 1
        except Refused as exc:
            self._refused(exc, f"abort of {dev.device_id}")
        except ProtocolError:
            self.stats.protocol_errors += 1

    async def _task(self, dev: _Device, sel: _Selector, assignment: Assignment) -> None:
        client = sel.client
        try:
            info = await client.wait_task(
                assignment, dev.device_id, give_up_after=self.max_task_wait
            )
            if info is None:
                self.stats.released += 1
                dev.assignment = dev.selector = None
                self._retry(dev)
                return
            if isinstance(info, Reconnect):
                self.stats.released += 1
                dev.assignment = dev.selector = None
                self._schedule(dev, dev.runtime.on_reconnect(info))
                return
            task = await client.task(assignment, info, dev.device_id, dev.token)
        except Unreachable as exc:
            # The selector holding this device is gone; its selection went with it.
            self._unreachable(sel, exc)
            dev.assignment = dev.selector = None
            self._retry(dev)
            return
        except ServerBusy as exc:
            self.stats.busy += 1
            await self._give_up(dev, "checkpoint-unavailable")
            self._schedule(dev, time.time() + exc.retry_after)
            return
        except Refused as exc:
            self._refused(exc, f"task of {dev.device_id}")
            await self._give_up(dev, "task-refused")
            self._retry(dev)
            return
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.warning("task of %s: %s", dev.device_id, exc)
            await self._give_up(dev, "bad-task")
            self._retry(dev)
            return
        self.stats.configured += 1
        self.rounds.observe(assignment.round_key, time.monotonic())

        # The drop-out and duration model of the embedded fleet, on scaled wall time.
        loop = asyncio.get_running_loop()
        started = loop.time()
        duration = (
            float(self.rng.lognormal(math.log(self.fleet.train_seconds), 0.35)) * self.time_scale
        )
        epochs = task.plan.local_epochs
        drops = bool(self.rng.random() < self.fleet.dropout_rate)
        lost_at = int(self.rng.integers(0, epochs)) if drops else epochs + 1
        stop_after = 99  # secure aggregation: drop out after this many messages (as embedded)
        if drops and task.privacy is not None and task.privacy.secure_aggregation:
            stage = int(self.rng.integers(0, 4))
            if stage > 0:
                lost_at, stop_after = epochs + 1, stage
        assert self._executor is not None
        try:
            env = await loop.run_in_executor(
                self._executor,
                dev.runtime.execute,
                task,
                time.time(),
                lambda epoch: epoch < lost_at,
            )
        except TaskAborted:
            self.stats.aborted += 1
            frac = (lost_at + 0.5) / max(1, epochs)
            await asyncio.sleep(max(0.0, started + duration * frac - loop.time()))
            await self._give_up(dev, "eligibility-lost")
            r = self.recheck_seconds
            self._later(dev, 0.5 * r, 1.5 * r)
            return
        await asyncio.sleep(max(0.0, started + duration - loop.time()))
        key = assignment.round_key
        spent = loop.time() - started
        self.compute_seconds[key] = max(spent, self.compute_seconds.get(key, 0.0))
        if isinstance(env, SecureContribution):
            await self._secure(dev, sel, env, stop_after)
        else:
            await self._report(dev, sel, env, task.assignment.aggregator)
        self._rest(dev)

    def _rest(self, dev: _Device) -> None:
        """After a report: rest ``rest_seconds`` (scaled), and ``rest_rounds`` rounds if longer."""
        seconds = self._pick.uniform(*self.rest_seconds) * self.time_scale
        rounds = None if self.rest_rounds is None else self._pick.uniform(*self.rest_rounds)
        self._schedule(dev, time.time() + rest_delay(seconds, rounds, self.rounds.interval))

    async def _secure(
        self, dev: _Device, sel: _Selector, contribution: SecureContribution, stop_after: int
    ) -> None:
        """Walk the Secure Aggregation session. Each step is relayed to the device's aggregator
        (whose session lives in memory) by the selector that selected the device, or — when
        that one is unreachable — by any other: selectors check the ticket statelessly, so a
        selector crash does not cost the group its devices."""
        c = contribution
        session = SecureSession(c)
        give_up = time.monotonic() + self.secagg_give_up_seconds
        order = [sel, *(s for s in self._candidates() if s is not sel)]
        sent = 0

        async def call(step: str, body: bytes = b"") -> dict[str, Any] | None:
            for _ in range(len(order)):
                relay = order[0]
                try:
                    answer = await relay.client.secagg(
                        c.round_key, c.device_id, c.ticket, c.aggregator, step, body
                    )
                except Unreachable as exc:
                    self._unreachable(relay, exc)
                    order.append(order.pop(0))  # try the next selector
                    continue
                if relay is not sel:
                    self.stats.secagg_rerouted += 1
                return answer
            raise Unreachable(f"no selector could relay {step} for {c.device_id}")

        try:
            step, body = session.start()
            while True:
                await call(step, body)
                session.sent(step)
                sent += 1
                if step == "advertise":
                    self.stats.reported += 1
                if session.done:
                    self.stats.secagg_completed += 1
                    return
                if sent >= stop_after:
                    self.stats.secagg_left += 1
                    return
                assert session.poll is not None
                while (published := await call(session.poll)) is None:
                    if time.monotonic() > give_up:
                        self.stats.secagg_left += 1
                        return
                    await asyncio.sleep(self.secagg_poll_seconds)
                step, body = await asyncio.get_running_loop().run_in_executor(
                    self._executor, session.answer, published
                )
        except Refused as exc:
            if exc.status != 410:
                self._refused(exc, f"secure aggregation of {dev.device_id}")
            self.stats.secagg_left += 1
        except SecAggError as exc:
            log.warning("device %s left secure aggregation: %s", dev.device_id, exc)
            self.stats.secagg_left += 1
        except (Unreachable, ServerBusy, ProtocolError):
            self.stats.secagg_left += 1
        finally:
            dev.assignment = dev.selector = None

    async def _report(
        self, dev: _Device, home: _Selector, env: ReportEnvelope, aggregator: str
    ) -> None:
        """Upload to the selector that selected the device; if it is unreachable, to another
        one (the ticket is checked statelessly, any selector of the job can forward it)."""
        others = [s for s in self._candidates() if s is not home]
        order = [home, *others]
        try:
            for attempt in range(self.report_attempts):
                sel = order[attempt % len(order)]
                try:
                    await sel.client.report(env, aggregator)
                except Unreachable as exc:
                    self._unreachable(sel, exc)
                    continue
                except ServerBusy as exc:
                    self.stats.busy += 1
                    if attempt + 1 < self.report_attempts:
                        await asyncio.sleep(exc.retry_after)
                    continue
                except Refused as exc:
                    self._refused(exc, f"report of {dev.device_id}")
                    return
                except ProtocolError:
                    self.stats.protocol_errors += 1
                    return
                self.stats.reported += 1
                return
        finally:
            dev.assignment = dev.selector = None
