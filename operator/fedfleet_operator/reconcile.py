"""The steps handlers share: make a job's children match its spec, and remove its actors.

Create, update and resume all converge the same set of objects with the same idempotent calls
(create, or patch what exists), so an operator that restarts, or a spec fixed after it was
invalid, ends where a clean create would have. Bodies come from :mod:`.builders`; this module
adds ownership (:func:`kopf.adopt`, so garbage collection removes the children with the FLJob)
and the one impure input, the job secret, which is random once and read back afterwards.
"""

from __future__ import annotations

import secrets
from typing import Any, cast

import kopf

from fedfleet.core.spec import FLJob
from fedfleet_operator.bodies import ChildBody
from fedfleet_operator.builders import (
    ACTOR_ROLES,
    build_actor_deployment,
    build_job_secret,
    build_plan_configmap,
    build_selector_service,
    is_job_secret,
    spec_hash,
)
from fedfleet_operator.context import OperatorContext
from fedfleet_operator.naming import (
    JOB_SECRET_KEY,
    ChildRole,
    deployment_name,
    plan_name,
    secret_name,
    service_name,
)
from fedfleet_operator.population import population_ref, with_population

__all__ = ["apply_children", "delete_actors", "delete_children", "new_job_secret", "owned"]


def new_job_secret() -> str:
    """32 random bytes as hex: the key actors derive the job's HMAC keys from."""
    return secrets.token_hex(32)


def owned(child: ChildBody, owner: kopf.Body) -> dict[str, Any]:
    """The child as a plain dict with the FLJob as its controlling owner."""
    body = cast(dict[str, Any], child)
    kopf.adopt(body, owner=owner)
    return body


def _namespace(job: FLJob) -> str:
    namespace = job.metadata.namespace
    if not namespace:  # validation.job_from_body refuses these; this is for the type checker
        raise ValueError(f"FLJob {job.name} has no namespace")
    return namespace


def apply_children(
    ctx: OperatorContext,
    job: FLJob,
    owner: kopf.Body,
    *,
    actors: bool = True,
    active_since: float | None = None,
    aggregators: int | None = None,
) -> list[str]:
    """Create or patch the plan ConfigMap and the Secret, and (unless ``actors`` is False, for
    a finished job) the actor Deployments and the selectors' Service (the selectors also
    serve the job's FLPopulation, when it exists). ``active_since`` is
    where the coordinator counts ``spec.activeDeadlineSeconds`` from; ``aggregators`` is the
    pool's size as the operator last set it (None: the initial size). Returns what it
    applied, as ``Kind/name``, for the log and the Event."""
    namespace = _namespace(job)
    applied: list[str] = []

    def apply(child: ChildBody) -> None:
        ctx.kube.apply(owned(child, owner))
        applied.append(f"{child['kind']}/{child['metadata']['name']}")

    # The plan and the Secret first: the actors' env refers to both.
    apply(build_plan_configmap(job, namespace))
    existing = ctx.kube.read_secret(namespace, secret_name(job.name)) or {}
    job_secret = existing.get(JOB_SECRET_KEY)
    if job_secret is None or not is_job_secret(job_secret):
        job_secret = new_job_secret()  # created once; kept for the life of the job
    apply(build_job_secret(job.name, namespace, job_secret, ctx.settings.job_redis_password))
    if actors:
        policy = spec_hash(job.spec)
        # An FLPopulation of the job's population, when one exists now: its selectors serve
        # the population's Service and enroll its devices (fedfleet_operator.population).
        found = ctx.kube.read_population(namespace, job.spec.population)
        population = population_ref(found) if found is not None else None
        for role in ACTOR_ROLES:
            deployment = build_actor_deployment(
                job, namespace, ctx.settings, policy, role, active_since, aggregators
            )
            if role is ChildRole.selector and population is not None:
                deployment = with_population(deployment, population)
            apply(deployment)
        apply(build_selector_service(job, namespace))
    return applied


def delete_actors(ctx: OperatorContext, namespace: str, name: str) -> list[str]:
    """Delete the actor Deployments and the Service (idempotent); keep the ConfigMap and the
    Secret, which describe the finished job. Returns what was actually deleted."""
    deleted: list[str] = []
    targets = [("Deployment", deployment_name(name, role)) for role in ACTOR_ROLES]
    targets.append(("Service", service_name(name)))
    for kind, child in targets:
        if ctx.kube.delete(kind, namespace, child):
            deleted.append(f"{kind}/{child}")
    return deleted


def delete_children(ctx: OperatorContext, namespace: str, name: str) -> list[str]:
    """Delete every child: the actors, the Service, the plan ConfigMap and the Secret (what
    ``spec.ttlSecondsAfterFinished`` removes before the FLJob). Returns what was deleted."""
    deleted = delete_actors(ctx, namespace, name)
    for kind, child in (("ConfigMap", plan_name(name)), ("Secret", secret_name(name))):
        if ctx.kube.delete(kind, namespace, child):
            deleted.append(f"{kind}/{child}")
    return deleted
