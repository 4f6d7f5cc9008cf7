"""How a real device waits and hands its result back, stoppable at any moment.

A device process must stop promptly on SIGTERM even while it holds a long-poll, sleeps through
a backoff or walks a Secure Aggregation session, so every wait of
:class:`~fedfleet.device.agent.DeviceAgent` goes through :class:`Interruptible`, which watches
a ``threading.Event`` (set by a signal handler or by the app) and raises :class:`Stopped`.

The ways a task ends live here too: the abort that gives it back (bounded, best effort), and
the two ways a trained update leaves the device: a plain report (retried on a busy
or unreachable selector: the round key is already recorded as reported, so the retries are of
the same single report), and the Secure Aggregation walk, which reuses the simulated fleet's
transport-free :class:`~fedfleet.device.secure.SecureSession` over one selector.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TypeVar

from fedfleet.core.protocol import Assignment, ReportEnvelope
from fedfleet.core.secagg import SecAggError
from fedfleet.device.http_transport import SelectorClient, ServerBusy, TransportError, Unreachable
from fedfleet.device.runtime import SecureContribution
from fedfleet.device.scheduling import backoff_delay, retry_after_delay
from fedfleet.device.secure import SecureSession

__all__ = [
    "Ineligible",
    "Interruptible",
    "Stopped",
    "abort_task",
    "upload_report",
    "walk_secure_aggregation",
]

log = logging.getLogger("fedfleet.device")

_T = TypeVar("_T")

REPORT_ATTEMPTS = 3
"""Uploads of one report before the device gives up on it (the round will not wait longer)."""


class Stopped(Exception):
    """The stop event was set while waiting."""


class Ineligible(Exception):
    """The device lost eligibility while waiting; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Interruptible:
    """Waits that end early (with :class:`Stopped`) once ``stop`` is set; checked every
    ``tick`` seconds, so a stop takes effect within that."""

    def __init__(self, stop: threading.Event, tick: float = 0.2) -> None:
        self.stop = stop
        self.tick = tick

    async def guard(
        self,
        aw: Awaitable[_T],
        check: Callable[[], str | None] | None = None,
        every: float = 2.0,
    ) -> _T:
        """Await ``aw`` unless the stop event is set first (then cancel it). ``check`` (asked
        every ``every`` seconds) names a reason to give up, raised as :class:`Ineligible`."""
        task = asyncio.ensure_future(aw)
        next_check = time.monotonic() + every
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.tick)
            if done:
                return task.result()
            failure: Exception | None = Stopped() if self.stop.is_set() else None
            if failure is None and check is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + every
                reason = check()
                failure = None if reason is None else Ineligible(reason)
            if failure is not None:
                task.cancel()
                with suppress(BaseException):
                    await task
                raise failure

    async def sleep(self, seconds: float) -> None:
        end = time.monotonic() + max(0.0, seconds)
        while not self.stop.is_set() and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(self.tick, left))
        if self.stop.is_set():
            raise Stopped


async def abort_task(
    client: SelectorClient, assignment: Assignment, device_id: str, reason: str
) -> None:
    """Tell the selector the device gives its task up (best effort, bounded: this also runs on
    the way out of a stopping process)."""
    key = assignment.round_key
    try:
        await asyncio.wait_for(
            client.abort(key, device_id, assignment.ticket, reason[:200]), timeout=5.0
        )
        log.info("round %s: aborted (%s)", key, reason)
    except (TransportError, TimeoutError) as exc:
        log.info("round %s: abort not delivered: %s", key, exc)


async def upload_report(
    client: SelectorClient,
    env: ReportEnvelope,
    aggregator: str,
    waits: Interruptible,
    rng: random.Random,
) -> bool:
    """Upload ``env``; True once accepted. Retries a busy or unreachable selector (honouring
    ``Retry-After``); a refusal (409: the round closed) is final."""
    for attempt in range(1, REPORT_ATTEMPTS + 1):
        try:
            await waits.guard(client.report(env, aggregator))
            return True
        except (Unreachable, ServerBusy) as exc:
            if attempt == REPORT_ATTEMPTS:
                log.info("report of %s: %s; giving up", env.round_key, exc)
                break
            delay = (
                retry_after_delay(exc.retry_after, attempt, rng)
                if isinstance(exc, ServerBusy)
                else backoff_delay(attempt, rng)
            )
            log.info("report of %s: %s; retrying in %.1fs", env.round_key, exc, delay)
            await waits.sleep(delay)
        except TransportError as exc:
            log.info("report of %s refused: %s", env.round_key, exc)
            return False
    return False


async def walk_secure_aggregation(
    client: SelectorClient,
    c: SecureContribution,
    waits: Interruptible,
    *,
    poll_seconds: float,
    give_up_seconds: float,
) -> bool:
    """Walk the Secure Aggregation session to its end (True), or leave it (False: a phase
    closed without this device, a forged message, the selector gone, no progress in time)."""
    session = SecureSession(c)
    give_up = time.monotonic() + give_up_seconds

    async def call(step: str, body: bytes = b"") -> dict[str, object] | None:
        return await waits.guard(
            client.secagg(c.round_key, c.device_id, c.ticket, c.aggregator, step, body)
        )

    try:
        step, body = session.start()
        while True:
            await call(step, body)
            session.sent(step)
            if session.done:
                return True
            assert session.poll is not None
            while (published := await call(session.poll)) is None:
                if time.monotonic() > give_up:
                    return False
                await waits.sleep(poll_seconds)
            step, body = await asyncio.to_thread(session.answer, dict(published))
    except (TransportError, SecAggError) as exc:
        log.info("secure aggregation of %s: %s", c.round_key, exc)
        return False
