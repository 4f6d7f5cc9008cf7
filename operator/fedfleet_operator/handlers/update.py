"""``@kopf.on.update`` of the spec, and ``@kopf.on.resume``: converge the children.

Every spec change re-applies all children, which is what each kind of change needs:
``spec.actors.selectors`` and the aggregator sizing change replicas; ``spec.suspend`` takes all
actors to zero replicas and back (they continue from the last checkpoint, which is in the
store); round policy, aggregation, eligibility and plan re-render the plan ConfigMap and change
the ``fedfleet.dev/spec-hash`` pod-template annotation, which rolls the actors so the policy
applies from the next round. ``spec.model`` and ``spec.population`` are immutable (CRD rules).

An invalid change leaves every child as it was (the job keeps running its last valid spec) and
sets ``Invalid``; a later valid change clears it, and creates the children if the job never had
them. A finished job gets no actors back. ``on.resume`` runs the same convergence when the
operator starts, so children deleted by hand, or built differently by an older operator, are
put right.
"""

from __future__ import annotations

from typing import Any

import kopf

from fedfleet_operator.conditions import Reason
from fedfleet_operator.context import OperatorContext, context_of
from fedfleet_operator.handlers.common import generation_of, report_invalid
from fedfleet_operator.naming import GROUP, PLURAL, VERSION
from fedfleet_operator.reconcile import apply_children
from fedfleet_operator.settings import OperatorSettings
from fedfleet_operator.status import TERMINAL_PHASES, changed_fields, spec_status
from fedfleet_operator.validation import InvalidJob, job_from_body

__all__ = ["on_resume", "on_update", "reconcile", "register"]


def reconcile(ctx: OperatorContext, body: kopf.Body, patch: kopf.Patch) -> list[str]:
    """Validate, re-apply the children, and write what the spec says about the status."""
    try:
        job = job_from_body(body)
    except InvalidJob as exc:
        raise report_invalid(ctx, body, patch, str(exc)) from None
    finished = body.status.get("phase") in TERMINAL_PHASES
    applied = apply_children(ctx, job, body, actors=not finished)
    new = spec_status(
        body.status,
        generation=generation_of(body),
        now=ctx.clock(),
        suspended=job.spec.suspend,
        rounds_total=job.spec.rounds.total,
    )
    patch.status.update(changed_fields(body.status, new))
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
    applied = reconcile(ctx, body, patch)
    logger.info("applied %s", ", ".join(applied))
    was_suspended = bool((old or {}).get("suspend", False))
    is_suspended = bool((new or {}).get("suspend", False))
    if is_suspended and not was_suspended:
        ctx.events.info(body, reason=Reason.SUSPEND_REQUESTED, message="actors scaled to zero")
    elif was_suspended and not is_suspended:
        ctx.events.info(
            body, reason=Reason.RESUMED, message="actors scaled back; continuing from the store"
        )


def on_resume(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    reconcile(context_of(memo), body, patch)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.update(GROUP, VERSION, PLURAL, id="update", field="spec", registry=registry)(on_update)
    kopf.on.resume(GROUP, VERSION, PLURAL, id="resume", registry=registry)(on_resume)
