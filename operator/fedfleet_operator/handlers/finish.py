"""A job that finished: its actors go, an Event says so; and a finished job's TTL.

Completion is level-triggered: the status timer, any change handler and the resume handler of
a restarted operator all read the store, and whichever first sees the store's job finished
while the FLJob's status does not say so yet runs :func:`clear_actors` before its status write
and :func:`announce` after it. Both are idempotent (deleting what is gone is a no-op; an
Event twice is harmless), so a handler that fails halfway is simply run again.

Which actors go: all of them when the job succeeded, or failed on its deadline (a deadline is
a limit on the resources the job holds, as a Kubernetes Job's pods are terminated on theirs);
a job that failed otherwise keeps them, since their logs explain the failure. The plan
ConfigMap and the Secret stay until ``spec.ttlSecondsAfterFinished`` (:func:`expire`), which
removes every child and then the FLJob; its keys in the store stay (see
:mod:`fedfleet_operator.handlers.delete`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from fedfleet.core.roles import JobPhase
from fedfleet_operator.conditions import Reason, failure_reason
from fedfleet_operator.context import OperatorContext
from fedfleet_operator.naming import job_key
from fedfleet_operator.reconcile import delete_actors, delete_children
from fedfleet_operator.status import TERMINAL_PHASES, fetch_command

__all__ = ["announce", "clear_actors", "expire", "finishing", "keeps_actors"]


def finishing(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """The new status finishes the job and the previous one did not say so yet."""
    return new.get("phase") in TERMINAL_PHASES and previous.get("phase") not in TERMINAL_PHASES


def keeps_actors(state: Mapping[str, Any]) -> bool:
    """A finished job keeps its actors only when it failed for a reason their logs explain."""
    if state.get("phase") != JobPhase.failed.value:
        return False
    return failure_reason(state.get("reason")) != Reason.DEADLINE_EXCEEDED


def clear_actors(
    ctx: OperatorContext, body: kopf.Body, state: Mapping[str, Any], logger: kopf.Logger
) -> None:
    if keeps_actors(state):
        return
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    deleted = delete_actors(ctx, namespace, name)
    if deleted:
        logger.info("the job finished: deleted %s", ", ".join(deleted))


def announce(
    ctx: OperatorContext, body: kopf.Body, status: Mapping[str, Any], state: Mapping[str, Any]
) -> None:
    """The Event of a job that just finished: where the model is, or why it failed."""
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    key = job_key(namespace, name)
    where = f"the model is in the store under {key}: {fetch_command(ctx.settings.store_url, key)}"
    if status.get("phase") == JobPhase.succeeded.value:
        accuracy = f", accuracy {status['accuracy']}" if "accuracy" in status else ""
        message = f"succeeded after {status.get('round', 0)} rounds{accuracy}; {where}"
        ctx.events.info(body, reason=Reason.SUCCEEDED, message=message)
        return
    reason = failure_reason(state.get("reason"))
    said = state.get("reason") or "no reason given"
    message = f"the job failed ({said}) after {status.get('round', 0)} rounds"
    if status.get("modelVersion"):
        message += f"; {where}"
    ctx.events.warn(body, reason=reason, message=message)


def expire(ctx: OperatorContext, body: kopf.Body, logger: kopf.Logger) -> None:
    """``spec.ttlSecondsAfterFinished`` passed: remove the children, then the FLJob."""
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    deleted = delete_children(ctx, namespace, name)
    message = (
        f"ttlSecondsAfterFinished passed: deleted {', '.join(deleted) or 'no children'} and "
        f"the FLJob; its model stays in the store under {job_key(namespace, name)}"
    )
    logger.info(message)
    ctx.events.info(body, reason=Reason.TTL_EXPIRED, message=message)
    ctx.kube.delete_fljob(namespace, name)
