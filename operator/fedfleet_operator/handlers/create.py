"""``@kopf.on.create``: a new FLJob gets its children, or an ``Invalid`` condition.

A spec that passes the CRD schema but not ``FLJobSpec`` (cross-field checks, an unusable name)
gets no children: the job stays Pending with ``Invalid=True`` (reason ``InvalidSpec``, the
pydantic message) and a Warning Event, and the handler fails permanently so kopf never loops on
it. Pending rather than Failed because the object is not finished: fixing the spec is an update,
which creates the children then (see :mod:`.update`).
"""

from __future__ import annotations

from typing import Any

import kopf

from fedfleet.store.base import StoreUnavailable
from fedfleet_operator.conditions import Reason
from fedfleet_operator.context import context_of
from fedfleet_operator.handlers.common import generation_of, leftover_in_store, report_invalid
from fedfleet_operator.lifetime import parse_time
from fedfleet_operator.naming import GROUP, PLURAL, VERSION, job_key
from fedfleet_operator.reconcile import apply_children
from fedfleet_operator.settings import OperatorSettings
from fedfleet_operator.status import changed_fields, spec_status
from fedfleet_operator.validation import InvalidJob, job_from_body

__all__ = ["on_create", "register"]


def on_create(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    ctx = context_of(memo)
    try:
        job = job_from_body(body)
    except InvalidJob as exc:
        raise report_invalid(ctx, body, patch, str(exc)) from None
    try:
        state = ctx.store.job_state(job_key(str(body.metadata.namespace), job.name))
    except StoreUnavailable:
        state = {}  # the actors wait for the store too; the status timer reports it
    problem = leftover_in_store(ctx, body, state)
    if problem is not None:
        raise report_invalid(ctx, body, patch, problem)
    new = spec_status(
        body.status,
        generation=generation_of(body),
        now=ctx.clock(),
        suspended=job.spec.suspend,
        rounds_total=job.spec.rounds.total,
    )
    started = parse_time(new.get("startTime"))
    applied = apply_children(ctx, job, body, active_since=started.timestamp() if started else None)
    patch.status.update(changed_fields(body.status, new))
    logger.info("created %s", ", ".join(applied))
    ctx.events.info(body, reason=Reason.CHILDREN_APPLIED, message="created " + ", ".join(applied))


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.create(GROUP, VERSION, PLURAL, id="create", registry=registry)(on_create)
