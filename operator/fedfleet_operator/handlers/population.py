"""kopf handlers of FLPopulation: its enrollment Secret, its gateway, its devices' Service,
its status.

``on.create``, ``on.update`` (spec) and ``on.resume`` converge the children the same way (see
:mod:`fedfleet_operator.population` for what they are): the Secret ``<name>-enrollment`` is
created once, when the spec names no Secret of the user's and none exists yet, with 32 random
bytes, and never rotated (devices' credentials derive from it); a Secret of that name that
holds no usable population secret is left alone with a Warning Event, never overwritten. The
gateway's Secret (the store's password, rewritten each time from the operator's settings), the
gateway Deployment and the Service are created or patched to their bodies (and, without
``spec.gateway.tls``, what TLS had added to the gateway is taken off by a second patch). All
are owned by the FLPopulation (never by an FLJob): deleting a job leaves the endpoint and its
gateway up, and they exist whether or not a job runs; deleting the population removes them by
garbage collection.

A timer refreshes ``status.jobs`` (the population's FLJobs not finished) every
``FEDFLEET_STATUS_INTERVAL`` seconds: one list of the namespace's FLJobs per population, and a
status write only when something changed. Like the FLJob status timer it writes the status
itself, so a failed write is a retried handler, not a timer kopf stops for good.

Which jobs' selectors serve the population is decided when a job's selector Deployment is
built (:func:`fedfleet_operator.reconcile.apply_children`). A job created before its
population would join it only on its next spec change, so the same handlers also patch the
selector Deployment of each of the population's unfinished FLJobs in the namespace
(:func:`fedfleet_operator.population.selector_population_patch`): their selectors get the
population secret and announce themselves to the gateway within a reconcile. A job whose
selectors do not exist (yet, or any more) is skipped; its own handlers build them served.
"""

from __future__ import annotations

import secrets
from typing import Any, cast

import kopf

from fedfleet.core.population_spec import FLPopulationSpec
from fedfleet_operator.bodies import ChildBody
from fedfleet_operator.context import OperatorContext, context_of
from fedfleet_operator.handlers.common import generation_of
from fedfleet_operator.kube import StatusWriteError
from fedfleet_operator.naming import GROUP, VERSION
from fedfleet_operator.population import (
    POPULATION_PLURAL,
    InvalidPopulation,
    PopulationRef,
    active_jobs,
    build_devices_service,
    build_enrollment_secret,
    build_gateway_deployment,
    build_gateway_secret,
    enrollment_secret_name,
    gateway_without_tls_patch,
    population_from_body,
    population_secret_from,
    population_status,
    selector_population_patch,
)
from fedfleet_operator.settings import OperatorSettings

__all__ = ["converge_population", "on_population", "register", "sync_population_status"]

_INVALID = "InvalidSpec"
_SECRET_KEPT = "EnrollmentSecretUnusable"
_JOBS_SERVED = "SelectorsServePopulation"


def _owned(child: ChildBody, owner: kopf.Body) -> dict[str, Any]:
    body = cast(dict[str, Any], child)
    kopf.adopt(body, owner=owner)
    return body


def _spec(ctx: OperatorContext, body: kopf.Body) -> FLPopulationSpec:
    try:
        return population_from_body(str(body.metadata.name), body.spec)
    except InvalidPopulation as exc:
        ctx.events.warn(body, reason=_INVALID, message=str(exc))
        raise kopf.PermanentError(f"invalid FLPopulation: {exc}") from None


def _jobs(ctx: OperatorContext, namespace: str, name: str) -> list[str]:
    return active_jobs(name, ctx.kube.list_fljobs(namespace))


def _serve_jobs(ctx: OperatorContext, body: kopf.Body, ref: PopulationRef, jobs: list[str]) -> None:
    """Patch the selector Deployments of the population's unfinished ``jobs`` to serve it
    (idempotent: a selector that serves it already is left as it is)."""
    namespace = str(body.metadata.namespace)
    patched = [
        job
        for job in jobs
        if ctx.kube.patch_existing(selector_population_patch(job, namespace, ref))
    ]
    if patched:
        ctx.events.info(
            body,
            reason=_JOBS_SERVED,
            message=f"selectors of FLJob {', '.join(patched)} serve the population",
        )


def converge_population(ctx: OperatorContext, body: kopf.Body) -> dict[str, Any]:
    """Create (once) the enrollment Secret; create or patch the gateway's Secret and
    Deployment and the Service; make the selectors of the population's jobs serve it; return
    the status to write."""
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    spec = _spec(ctx, body)
    if spec.enrollment.secret_name is None:
        secret_name = enrollment_secret_name(name)
        existing = ctx.kube.read_secret(namespace, secret_name)
        secret: bytes | None = (
            secrets.token_bytes(32)  # created once; never rotated
            if existing is None
            else population_secret_from(existing)
        )
        if secret is not None:
            ctx.kube.apply(_owned(build_enrollment_secret(name, namespace, secret), body))
        else:
            ctx.events.warn(
                body,
                reason=_SECRET_KEPT,
                message=f"Secret {secret_name} holds no usable population-secret (hex, at "
                "least 16 bytes); left as it is: fix or delete it",
            )
    # The gateway's Secret before its Deployment, whose env refers to it.
    password = ctx.settings.job_redis_password
    ctx.kube.apply(_owned(build_gateway_secret(name, namespace, password), body))
    ctx.kube.apply(_owned(build_gateway_deployment(name, namespace, spec, ctx.settings), body))
    if spec.gateway.tls is None:  # TLS taken out of the spec: take it off the gateway too
        ctx.kube.patch_existing(gateway_without_tls_patch(name, namespace))
    ctx.kube.apply(_owned(build_devices_service(name, namespace, spec), body))
    jobs = _jobs(ctx, namespace, name)
    ref = PopulationRef(name, spec.enrollment.secret_name or enrollment_secret_name(name))
    _serve_jobs(ctx, body, ref, jobs)
    return population_status(name, namespace, spec, jobs, generation_of(body))


def on_population(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    ctx = context_of(memo)
    status = converge_population(ctx, body)
    patch.status.update({k: v for k, v in status.items() if body.status.get(k) != v})
    logger.info("population endpoint %s", status["endpoint"])


def sync_population_status(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    ctx = context_of(memo)
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    try:
        spec = population_from_body(name, body.spec)
    except InvalidPopulation:
        return  # reported by the change handler
    status = population_status(
        name, namespace, spec, _jobs(ctx, namespace, name), generation_of(body)
    )
    changed = {k: v for k, v in status.items() if body.status.get(k) != v}
    if not changed:
        return
    try:
        ctx.kube.patch_population_status(namespace, name, changed)
    except StatusWriteError as exc:
        raise kopf.TemporaryError(
            f"status not written, trying again: {exc}", delay=ctx.settings.status_interval
        ) from exc


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    resource = (GROUP, VERSION, POPULATION_PLURAL)
    kopf.on.create(*resource, id="population-create", registry=registry)(on_population)
    kopf.on.update(*resource, id="population-update", field="spec", registry=registry)(
        on_population
    )
    kopf.on.resume(*resource, id="population-resume", registry=registry)(on_population)
    kopf.timer(
        *resource,
        id="population-status",
        interval=settings.status_interval,
        registry=registry,
    )(sync_population_status)
