"""Small pieces the handlers share: reading the object, reporting an invalid spec, and spotting
an earlier job's record left in the store under this job's key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from fedfleet_operator.conditions import Reason
from fedfleet_operator.context import OperatorContext
from fedfleet_operator.lifetime import leftover_problem
from fedfleet_operator.naming import job_key
from fedfleet_operator.status import changed_fields, fetch_command, spec_status

__all__ = ["generation_of", "leftover_in_store", "report_invalid"]


def generation_of(body: kopf.Body) -> int | None:
    generation = body.metadata.get("generation")
    return int(generation) if isinstance(generation, int) else None


def report_invalid(
    ctx: OperatorContext, body: kopf.Body, patch: kopf.Patch, problem: str
) -> kopf.PermanentError:
    """Write the ``Invalid`` condition and a Warning Event; return the error to raise.

    The phase is left alone (see :func:`~fedfleet_operator.status.spec_status`): a new job
    stays Pending, a running one keeps running its last valid spec. Raising
    :class:`kopf.PermanentError` records the handler as failed, so kopf does not retry it; the
    next edit of the spec is a new change and is handled afresh.
    """
    new = spec_status(body.status, generation=generation_of(body), now=ctx.clock(), invalid=problem)
    patch.status.update(changed_fields(body.status, new))
    ctx.events.warn(body, reason=Reason.INVALID_SPEC, message=problem)
    return kopf.PermanentError(f"invalid FLJob spec: {problem}")


def leftover_in_store(
    ctx: OperatorContext, body: kopf.Body, state: Mapping[str, Any]
) -> str | None:
    """The problem, if the store's record ``state`` is an earlier FLJob's of the same name
    (see :func:`~fedfleet_operator.lifetime.leftover_problem`)."""
    key = job_key(str(body.metadata.namespace), str(body.metadata.name))
    return leftover_problem(
        state,
        body.metadata.get("creationTimestamp"),
        key,
        fetch_command(ctx.settings.store_url, key),
    )
