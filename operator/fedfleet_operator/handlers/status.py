"""``@kopf.timer``: a job's progress, read from the store, written into its ``.status``.

Every ``FEDFLEET_STATUS_INTERVAL`` seconds per FLJob: read ``job_state`` (and ``metrics`` when
a round was committed since the last look), compute the status (:mod:`fedfleet_operator.status`)
and patch the fields that changed, so an idle job costs no API writes.

When the store reports the job Succeeded, the actor Deployments and the Service are deleted
(the ConfigMap and the Secret stay: they describe the job and the model's location), a Normal
Event says where the model is, and the timer stops reading the store for it: a finished job's
status never changes again. A Failed job keeps its actors, whose logs explain the failure.

An unreachable store is a state, not an error: ``Ready`` becomes False with reason
``StoreUnavailable``, everything else keeps its last known value, one warning is logged when
it starts, and the timer simply tries again next interval (no exception, so no kopf retry
storm and no traceback every five seconds).
"""

from __future__ import annotations

from typing import Any

import kopf

from fedfleet.core.roles import JobPhase
from fedfleet.store.base import StoreUnavailable
from fedfleet_operator.conditions import READY, Reason, find_condition
from fedfleet_operator.context import OperatorContext, context_of
from fedfleet_operator.handlers.common import generation_of
from fedfleet_operator.naming import GROUP, PLURAL, VERSION, job_key
from fedfleet_operator.reconcile import delete_actors
from fedfleet_operator.settings import OperatorSettings
from fedfleet_operator.status import (
    TERMINAL_PHASES,
    FLJobStatus,
    changed_fields,
    failure_message,
    failure_reason,
    fetch_command,
    status_from_store,
    store_unavailable_status,
)
from fedfleet_operator.validation import InvalidJob, job_from_body

__all__ = ["register", "sync_status"]


def _spec_facts(body: kopf.Body) -> tuple[str | None, bool, int | None]:
    """(validation problem, suspended, rounds total) of the current spec."""
    try:
        job = job_from_body(body)
    except InvalidJob as exc:
        return str(exc), bool(body.spec.get("suspend", False)), None
    return None, job.spec.suspend, job.spec.rounds.total


def _finish(
    ctx: OperatorContext, body: kopf.Body, status: FLJobStatus, logger: kopf.Logger
) -> None:
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    deleted = delete_actors(ctx, namespace, name)
    key = job_key(namespace, name)
    accuracy = f", accuracy {status['accuracy']}" if "accuracy" in status else ""
    message = (
        f"succeeded after {status.get('round', 0)} rounds{accuracy}; the model is in the store "
        f"under {key}: {fetch_command(ctx.settings.store_url, key)}"
    )
    logger.info("%s (deleted %s)", message, ", ".join(deleted) or "nothing")
    ctx.events.info(body, reason=Reason.SUCCEEDED, message=message)


def sync_status(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    ctx = context_of(memo)
    previous = body.status
    if previous.get("phase") in TERMINAL_PHASES:
        return
    key = job_key(str(body.metadata.namespace), str(body.metadata.name))
    invalid, suspended, rounds_total = _spec_facts(body)
    now = ctx.clock()
    try:
        state = ctx.store.job_state(key)
        fresh_commit = state.get("model_version") != previous.get("modelVersion")
        metrics = ctx.store.metrics(key) if fresh_commit or "lastRound" not in previous else []
    except StoreUnavailable as exc:
        ready = find_condition(previous.get("conditions") or [], READY)
        if ready is None or ready.get("reason") != Reason.STORE_UNAVAILABLE:
            logger.warning("cannot read progress of %s from the store: %s", key, exc)
        new = store_unavailable_status(previous, f"cannot read progress: {exc}", now=now)
        patch.status.update(changed_fields(previous, new))
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
    )
    if new.get("phase") == JobPhase.succeeded.value:
        _finish(ctx, body, new, logger)  # before the patch: if deleting fails, retry it all
    elif new.get("phase") == JobPhase.failed.value:
        ctx.events.warn(
            body, reason=failure_reason(state), message=f"the job failed: {failure_message(state)}"
        )
    patch.status.update(changed_fields(previous, new))


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.timer(
        GROUP, VERSION, PLURAL, id="status", interval=settings.status_interval, registry=registry
    )(sync_status)
