"""A job running in the deployed shape while a test looks at it from outside.

:func:`live_job` starts a :class:`~fedfleet.local.LocalDeployment` over a given Redis and drives
it with the HTTP simulated fleet on its own event loop in a thread, then yields the deployment:
the test reads the store (or serves a dashboard over it) while rounds commit, and leaving the
block stops the fleet and the actors. One actor per role keeps start-up short on a loaded
machine; the start timeout is generous for the same reason (it bounds a hang; it is not a
performance check).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedfleet.core.spec import FLJob
from fedfleet.device.http_fleet import HttpFleet
from fedfleet.local import LocalDeployment
from fedfleet.up import UpOptions

__all__ = ["FleetThread", "live_job"]


class FleetThread:
    """The HTTP fleet on its own event loop in a thread, stopped on leaving the block."""

    def __init__(self, fleet: HttpFleet) -> None:
        self._fleet = fleet
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await self._fleet.run(until=self._stop)

    def __enter__(self) -> FleetThread:
        self._thread.start()
        assert self._ready.wait(30), "the fleet's event loop did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


@contextmanager
def live_job(
    job: FLJob, store_url: str, *, start_timeout: float = 240.0
) -> Iterator[LocalDeployment]:
    d = LocalDeployment(
        job,
        store_url=store_url,
        tick_seconds=0.1,
        lease_ttl=2.0,
        coordinators=1,
        selectors=1,
        aggregators=1,
    )
    try:
        d.start(timeout=start_timeout)
        fleet = HttpFleet(
            job,
            d.urls("selector"),
            d.keys,
            time_scale=0.01,
            rest_seconds=UpOptions().rest_seconds,
            rest_rounds=UpOptions().rest_rounds,
        )
        with FleetThread(fleet):
            yield d
    finally:
        d.stop()
