"""``@kopf.timer``: a job's progress, read from the store, written into its ``.status``.

Every ``FEDFLEET_STATUS_INTERVAL`` seconds per FLJob: read ``job_state`` (and ``metrics`` when
a round was committed since the last look), compute the status (:mod:`fedfleet_operator.status`)
and write the fields that changed, so an idle job costs no API writes.

**The handler writes the status itself** (``ChildClient.patch_status``), with the object's
``resourceVersion`` as a precondition, instead of returning a patch for kopf to apply. This is
the fix for a status that stayed ``Running`` after the operator had posted the job's Succeeded
Event: kopf applies a timer's patch after the handler has returned, outside of its error
handling, and an API error there (a 5xx or a timeout past kopf's retries, any 4xx) ends the
timer's task; kopf then marks the timer as stopped for good for that object
(``DaemonsMemory.forever_stopped``) and never spawns it again in that process. The Event, posted
inside the handler, had gone out; the status write had not, and nothing else read the store
again. Now a failed write fails the handler (:class:`kopf.TemporaryError`, retried after one
interval), the Event is posted only after the write landed, a write based on an outdated read
is refused rather than applied (409), and the change and resume handlers also bring a finished
job's status to the store's truth (:mod:`.update`): completion is level-triggered.

While the job runs, each tick also sizes its aggregator pool (:mod:`.scale`) and writes the
pool's state into ``status.aggregators``.

When the store reports the job finished: see :mod:`.finish` (actors deleted, an Event). A
finished job's status never changes again, and the timer no longer reads the store for it; it
only waits for ``spec.ttlSecondsAfterFinished``. For a job past ``spec.activeDeadlineSeconds``
whose coordinator is not running, the timer ends the job in the store itself
(:func:`~fedfleet_operator.lifetime.end_past_deadline`).

An unreachable store is a state, not an error: ``Ready`` becomes False with reason
``StoreUnavailable``, everything else keeps its last known value, one warning is logged when
it starts, and the timer simply tries again next interval (no exception, so no kopf retry
storm and no traceback every five seconds).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from fedfleet.core.roles import JobPhase
from fedfleet.core.spec import FLJob
from fedfleet.store.base import StoreUnavailable
from fedfleet_operator.conditions import READY, Reason, find_condition
from fedfleet_operator.context import OperatorContext, context_of
from fedfleet_operator.handlers.common import generation_of, leftover_in_store
from fedfleet_operator.handlers.finish import announce, clear_actors, expire, finishing
from fedfleet_operator.handlers.scale import scale_pool
from fedfleet_operator.kube import StatusWriteError
from fedfleet_operator.lifetime import end_past_deadline, past_deadline, ttl_expired
from fedfleet_operator.naming import GROUP, PLURAL, VERSION, job_key
from fedfleet_operator.settings import OperatorSettings
from fedfleet_operator.status import (
    TERMINAL_PHASES,
    changed_fields,
    status_from_store,
    store_unavailable_status,
)
from fedfleet_operator.validation import InvalidJob, job_from_body

__all__ = ["register", "sync_status", "write_status"]


def _spec_facts(body: kopf.Body) -> tuple[str | None, bool, FLJob | None]:
    """(validation problem, suspended, the job when valid) of the current spec."""
    try:
        job = job_from_body(body)
    except InvalidJob as exc:
        return str(exc), bool(body.spec.get("suspend", False)), None
    return None, job.spec.suspend, job


def write_status(
    ctx: OperatorContext, body: kopf.Body, previous: Mapping[str, Any], new: Mapping[str, Any]
) -> bool:
    """Write the fields of ``new`` that differ from ``previous``, if the object is still the
    one that was read; False when nothing changed. A write that did not land raises
    :class:`kopf.TemporaryError`: kopf calls the timer again after one interval."""
    fields = changed_fields(previous, new)
    if not fields:
        return False
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    version = body.metadata.get("resourceVersion")
    try:
        ctx.kube.patch_status(namespace, name, fields, str(version) if version else None)
    except StatusWriteError as exc:
        raise kopf.TemporaryError(
            f"status not written, trying again: {exc}", delay=ctx.settings.status_interval
        ) from exc
    return True


def sync_status(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    ctx = context_of(memo)
    previous = body.status
    now = ctx.clock()
    if previous.get("phase") in TERMINAL_PHASES:
        if ttl_expired(body.spec, previous, now):
            expire(ctx, body, logger)
        return
    key = job_key(str(body.metadata.namespace), str(body.metadata.name))
    invalid, suspended, job = _spec_facts(body)
    rounds_total = job.spec.rounds.total if job is not None else None
    try:
        state = ctx.store.job_state(key)
        if leftover_in_store(ctx, body, state) is not None:
            return  # an earlier job's record: the create handler reported it (Invalid)
        if past_deadline(body.spec, previous, now) and end_past_deadline(
            ctx.store, key, now=now.timestamp(), lease_ttl=ctx.settings.lease_ttl
        ):
            logger.info("%s passed its deadline with no coordinator running: ended it", key)
            state = ctx.store.job_state(key)
        fresh_commit = state.get("model_version") != previous.get("modelVersion")
        metrics = ctx.store.metrics(key) if fresh_commit or "lastRound" not in previous else []
    except StoreUnavailable as exc:
        ready = find_condition(previous.get("conditions") or [], READY)
        if ready is None or ready.get("reason") != Reason.STORE_UNAVAILABLE:
            logger.warning("cannot read progress of %s from the store: %s", key, exc)
        new = store_unavailable_status(previous, f"cannot read progress: {exc}", now=now)
        write_status(ctx, body, previous, new)
        return
    new = status_from_store(
        state,
        metrics,
        key=key,
        store_url=ctx.settings.store_url,
        generation=generation_of(body),
        now=now,
        previous=previous,
        suspended=suspended,
        invalid=invalid,
        rounds_total=rounds_total,
        checkpoints=None if job is None else job.spec.checkpoints,  # invalid: defaults rank
    )
    done = finishing(previous, new)
    if job is not None and new.get("phase") == JobPhase.running.value and not done:
        pool = scale_pool(ctx, body, job, previous, logger)
        if pool is not None:
            new["aggregators"] = dict(pool)
    if done:
        clear_actors(ctx, body, state, logger)  # before the write: if it fails, all is retried
    if write_status(ctx, body, previous, new) and done:
        announce(ctx, body, new, state)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.timer(
        GROUP, VERSION, PLURAL, id="status", interval=settings.status_interval, registry=registry
    )(sync_status)
