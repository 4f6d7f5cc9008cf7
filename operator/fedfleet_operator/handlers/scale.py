"""Resizing a running job's aggregator pool, from the status timer.

Each status tick of a Running job reads the pool's side of the store (registered aggregators,
the draining set, the loads they publish, the rounds they hold, the last attempts), asks
:func:`fedfleet_operator.pool.plan_pool` what to do, and does it in the order that never cuts
a round: write the draining set first (the coordinator stops giving those aggregators rounds),
mark the pods to remove with the lowest pod-deletion cost, then set the Deployment's replicas.
Each decision is an Event; the plan's ``status.aggregators`` is written with the rest of the
status by the timer, and only when the pool or a decision changed (its reason and figures are
the last decision's), so a running job's measured rates do not cost a status write per tick.

Resizing is best effort: a store or API error here is logged and the pool is left as it was
until the next tick; it never stops the status from being reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import kopf

from fedfleet.core.roles import Role
from fedfleet.core.spec import FLJob
from fedfleet_operator.context import OperatorContext
from fedfleet_operator.naming import ChildRole, deployment_name, job_key
from fedfleet_operator.pool import (
    POD_DELETION_COST,
    REMOVED_POD_COST,
    AggregatorStatus,
    PoolSnapshot,
    plan_pool,
)

__all__ = ["RECENT_ATTEMPTS", "scale_pool", "snapshot"]

RECENT_ATTEMPTS = 8
_STATE_KEYS = ("replicas", "desired", "current", "draining", "leaving", "lowSince", "lowPeak")
"""The fields of ``status.aggregators`` that change only with the pool or a decision."""
"""Finished attempts read per look (the newest), for the expected round time."""


def snapshot(ctx: OperatorContext, key: str) -> PoolSnapshot:
    """One look at the store's side of the job's aggregator pool."""
    store = ctx.store
    live = store.members(key, Role.aggregator)
    return PoolSnapshot(
        live=sorted(live),
        draining=frozenset(store.draining(key)),
        loads=store.actor_loads(key),
        busy=frozenset(a for r in store.rounds(key) if r.active for a in r.aggregators),
        attempts=store.attempts(key, -RECENT_ATTEMPTS),
    )


def scale_pool(
    ctx: OperatorContext,
    body: kopf.Body,
    job: FLJob,
    previous: Mapping[str, Any],
    logger: kopf.Logger,
) -> AggregatorStatus | None:
    """Apply the next step of the pool's plan; its ``status.aggregators`` (None: no change,
    because the store or the API could not be reached)."""
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    key = job_key(namespace, name)
    before = previous.get("aggregators")
    before = before if isinstance(before, Mapping) else {}
    try:
        snap = snapshot(ctx, key)
        plan = plan_pool(job.spec, before, snap, ctx.clock().timestamp())
        if set(plan.draining) != snap.draining:
            ctx.store.set_draining(key, plan.draining)
        for pod in plan.remove:
            ctx.kube.annotate_pod(namespace, pod, {POD_DELETION_COST: REMOVED_POD_COST})
        was = before.get("replicas", job.spec.actors.aggregator_count(job.spec.rounds))
        if plan.replicas != was:
            ctx.kube.scale(namespace, deployment_name(name, ChildRole.aggregator), plan.replicas)
    except Exception as exc:  # a resize must never stop the status: try again next tick
        logger.warning("aggregator pool of %s not resized this time: %s", key, exc)
        return None
    for reason, message in plan.events:
        logger.info("aggregator pool of %s: %s", key, message)
        ctx.events.info(body, reason=reason, message=message)
    if not plan.events and all(before.get(k) == plan.status.get(k) for k in _STATE_KEYS):
        # Nothing was decided: keep the last decision's reason and figures rather than write
        # the status on every tick because a measured rate moved.
        return cast(AggregatorStatus, dict(before))
    return plan.status
