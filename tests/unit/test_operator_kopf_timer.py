"""Why the status timer writes the status itself: kopf's own timer loop, run for real.

The cluster run whose FLJob stayed ``Running`` after its Succeeded Event: kopf applies a timer's
patch after the handler returned, and when that patch fails (an API error past kopf's retries)
the exception leaves kopf's timer task. kopf then records the timer as stopped for good for that
object (``DaemonsMemory.forever_stopped``) and never runs it again in that process; the only
trace is asyncio's "Task exception was never retrieved". A failure *inside* the handler, which
is how ``sync_status`` reports a status write that did not land, is retried instead.

These tests drive kopf's private timer machinery (``kopf._core.engines.daemons``) directly, so
a kopf upgrade that changes it shows up here first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast
from unittest import mock

import kopf
import pytest
from kopf._cogs.structs import bodies, patches, references
from kopf._core.actions import application
from kopf._core.engines import daemons
from kopf._core.intents import causes

pytestmark = pytest.mark.unit

INTERVAL = 0.02


def _run_timer(
    fn: Any, *, patch_fails: bool, runs: int = 4
) -> tuple[int, set[str], BaseException | None]:
    """Run ``fn`` as a kopf timer on one FLJob until it ran ``runs`` times (or for long
    enough that it would have); returns (runs seen, kopf's forever-stopped handler ids, the
    exception the timer's task ended with)."""
    calls: list[int] = []
    ended: list[BaseException | None] = [None]

    def handler_fn(**kwargs: Any) -> None:
        calls.append(1)
        fn(**kwargs)

    async def failing_patch(**_: Any) -> Any:
        raise RuntimeError("PATCH fljobs/status: 503 after kopf's retries")

    async def main() -> set[str]:
        registry = kopf.OperatorRegistry()
        kopf.timer(
            "fedfleet.dev", "v1alpha1", "fljobs", id="status", interval=INTERVAL, registry=registry
        )(handler_fn)
        handlers = list(registry._spawning.get_all_handlers())
        resource = references.Resource(
            "fedfleet.dev",
            "v1alpha1",
            "fljobs",
            subresources=frozenset({"status"}),
            namespaced=True,
        )
        raw = {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "mnist", "namespace": "team-a", "uid": "u"},
            "status": {"phase": "Running"},
        }
        body = bodies.Body(cast(bodies.RawBody, raw))
        memory = daemons.DaemonsMemory(live_fresh_body=body)
        cause = causes.SpawningCause(
            resource=resource,
            indices=cast(Any, {}),
            logger=logging.getLogger("test.kopf"),
            patch=patches.Patch(),
            body=body,
            memo=kopf.Memo(),
            reset=False,
        )
        settings = kopf.OperatorSettings()
        running: dict[Any, daemons.Daemon] = {}
        patcher = mock.patch.object(
            application, "patch_and_check", failing_patch if patch_fails else _no_patch
        )
        with patcher:
            await daemons.spawn_daemons(
                settings=settings, handlers=handlers, daemons=running, cause=cause, memory=memory
            )
            tasks = [daemon.task for daemon in running.values()]
            for _ in range(200):  # ample time for `runs` runs; stop as soon as they happened
                await asyncio.sleep(INTERVAL)
                if len(calls) >= runs or not running:
                    break
            for daemon in list(running.values()):
                daemon.stopper.set(reason=daemons.stoppers.DaemonStoppingReason.OPERATOR_EXITING)
                await asyncio.wait([daemon.task], timeout=5)
            if patch_fails:
                await asyncio.sleep(INTERVAL * 10)  # it would have run again by now
        for task in tasks:
            if task.done() and not task.cancelled():
                ended[0] = task.exception()
        return {str(h) for h in memory.forever_stopped}

    stopped = asyncio.run(main())
    return len(calls), stopped, ended[0]


async def _no_patch(**_: Any) -> tuple[None, None]:
    return None, None


def _writes_status_via_kopf(patch: kopf.Patch, **_: Any) -> None:
    patch.status["phase"] = "Succeeded"  # what the old timer returned for kopf to apply


def _write_fails_inside(**_: Any) -> None:
    raise kopf.TemporaryError("status not written, trying again: 503", delay=INTERVAL)


def test_a_failed_patch_after_the_timer_ends_it_for_good(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.CRITICAL):
        runs, stopped, ended = _run_timer(_writes_status_via_kopf, patch_fails=True)
    assert runs == 1  # the one whose patch failed; never called again
    assert stopped == {"status"}
    assert isinstance(ended, RuntimeError) and "503" in str(ended)


def test_a_failed_write_inside_the_timer_is_retried() -> None:
    runs, stopped, ended = _run_timer(_write_fails_inside, patch_fails=False)
    assert runs >= 4
    assert stopped == set() and ended is None
