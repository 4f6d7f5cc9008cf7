"""``@kopf.on.update`` of the spec, and ``@kopf.on.resume``: converge the children.

Every spec change re-applies all children, which is what each kind of change needs:
``spec.actors.selectors`` changes replicas (the aggregators keep the size the status timer
gave the pool, ``status.aggregators.replicas``, which then follows the new sizing fields);
``spec.suspend`` takes all actors to zero replicas and back (they continue from the last
checkpoint, which is in the store); round policy, aggregation, eligibility and plan
re-render the plan ConfigMap and change the ``fedfleet.dev/spec-hash`` pod-template
annotation, which rolls the actors so the policy applies from the next round. ``spec.model``
and ``spec.population`` are immutable (CRD rules).

An invalid change leaves every child as it was (the job keeps running its last valid spec) and
sets ``Invalid``; a later valid change clears it, and creates the children if the job never had
them. A finished job gets no actors back. ``on.resume`` runs the same convergence when the
operator starts, so children deleted by hand, or built differently by an older operator, are
put right.

Both also read the job's record in the store: when it says the job finished, the status is
computed from it (and the job's actors go, and the Event is posted: :mod:`.finish`), so a
completion the status timer missed is caught by the next spec change or operator restart.
Progress short of that stays the timer's. Resuming a suspended job restarts the clock of
``spec.activeDeadlineSeconds`` (``status.startTime``), which the coordinator is given.
"""

from __future__ import annotations

from typing import Any

import kopf

from fedfleet.store.base import StoreUnavailable
from fedfleet_operator.conditions import Reason
from fedfleet_operator.context import OperatorContext, context_of
from fedfleet_operator.handlers.common import generation_of, leftover_in_store, report_invalid
from fedfleet_operator.handlers.finish import announce, clear_actors, finishing
from fedfleet_operator.lifetime import parse_time
from fedfleet_operator.naming import GROUP, PLURAL, VERSION, job_key
from fedfleet_operator.reconcile import apply_children
from fedfleet_operator.settings import OperatorSettings
from fedfleet_operator.status import (
    TERMINAL_PHASES,
    FLJobStatus,
    changed_fields,
    spec_status,
    status_from_store,
)
from fedfleet_operator.validation import InvalidJob, job_from_body

__all__ = ["on_resume", "on_update", "reconcile", "register"]


def _job_state(ctx: OperatorContext, key: str) -> dict[str, Any]:
    """The job's record; empty when the store is unreachable (the timer reports that)."""
    try:
        return ctx.store.job_state(key)
    except StoreUnavailable:
        return {}


def reconcile(
    ctx: OperatorContext, body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger
) -> list[str]:
    """Validate, re-apply the children, and write what the spec (and, for a finished job,
    the store) says about the status."""
    try:
        job = job_from_body(body)
    except InvalidJob as exc:
        raise report_invalid(ctx, body, patch, str(exc)) from None
    key = job_key(str(body.metadata.namespace), str(body.metadata.name))
    record = _job_state(ctx, key)
    problem = leftover_in_store(ctx, body, record)
    if problem is not None:
        raise report_invalid(ctx, body, patch, problem)
    state = record if record.get("phase") in TERMINAL_PHASES else None
    previous, now = body.status, ctx.clock()
    new: FLJobStatus = spec_status(
        previous,
        generation=generation_of(body),
        now=now,
        suspended=job.spec.suspend,
        rounds_total=job.spec.rounds.total,
    )
    if state is not None:
        new = status_from_store(
            state,
            ctx.store.metrics(key),
            key=key,
            store_url=ctx.settings.store_url,
            generation=generation_of(body),
            now=now,
            previous={**previous, **new},
            suspended=job.spec.suspend,
            rounds_total=job.spec.rounds.total,
            checkpoints=job.spec.checkpoints,
        )
    done = state is not None and finishing(previous, new)
    if done and state is not None:
        clear_actors(ctx, body, state, logger)
    started = parse_time(new.get("startTime"))
    pool = previous.get("aggregators")
    sized = pool.get("replicas") if isinstance(pool, dict) else None
    applied = apply_children(
        ctx,
        job,
        body,
        actors=new.get("phase") not in TERMINAL_PHASES,
        active_since=started.timestamp() if started else None,
        aggregators=sized if isinstance(sized, int) else None,
    )
    patch.status.update(changed_fields(previous, new))
    if done and state is not None:
        announce(ctx, body, new, state)
    return applied


def on_update(
    body: kopf.Body,
    old: Any,
    new: Any,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    ctx = context_of(memo)
    applied = reconcile(ctx, body, patch, logger)
    logger.info("applied %s", ", ".join(applied))
    was_suspended = bool((old or {}).get("suspend", False))
    is_suspended = bool((new or {}).get("suspend", False))
    if is_suspended and not was_suspended:
        ctx.events.info(body, reason=Reason.SUSPENDED, message="actors scaled to zero")
    elif was_suspended and not is_suspended:
        ctx.events.info(
            body, reason=Reason.RESUMED, message="actors scaled back; continuing from the store"
        )


def on_resume(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    reconcile(context_of(memo), body, patch, logger)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.update(GROUP, VERSION, PLURAL, id="update", field="spec", registry=registry)(on_update)
    kopf.on.resume(GROUP, VERSION, PLURAL, id="resume", registry=registry)(on_resume)
