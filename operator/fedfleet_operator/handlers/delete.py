"""``@kopf.on.delete`` under the finalizer ``fedfleet.dev/cleanup``: remove the job's keys.

The children go by garbage collection (they are owned by the FLJob); what Kubernetes cannot
remove is the job's state in the store — rounds, checkpoints (the model), metrics — under the
key ``<namespace>/<name>``. ``store.delete_job(key)`` removes it.

When the store is unreachable the handler raises :class:`kopf.TemporaryError` and kopf retries
after ``FEDFLEET_CLEANUP_RETRY_DELAY`` seconds, up to ``FEDFLEET_CLEANUP_ATTEMPTS`` attempts
(about two minutes by default). Then it gives up: a Warning Event names the key left behind,
and the handler returns, so kopf removes the finalizer. A dead Redis must never hold an FLJob,
and with it its namespace, in Terminating forever; a few orphaned keys are the lesser harm, and
the Event says which.

A job removed by its ``spec.ttlSecondsAfterFinished`` (finished, and past its TTL: the status
timer deletes it then, see :mod:`.finish`) keeps its keys: the TTL tidies the cluster, while
what happens to trained models is the store's business, and the model stays fetchable with
``fedfleet fetch-model --job <namespace>/<name>``. Deleting the FLJob by hand before its TTL
cleans the store as always.
"""

from __future__ import annotations

from typing import Any

import kopf

from fedfleet.store.base import StoreUnavailable
from fedfleet_operator.conditions import Reason
from fedfleet_operator.context import context_of
from fedfleet_operator.lifetime import ttl_expired
from fedfleet_operator.naming import GROUP, PLURAL, VERSION, job_key
from fedfleet_operator.settings import OperatorSettings

__all__ = ["on_delete", "register"]


def on_delete(body: kopf.Body, retry: int, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    ctx = context_of(memo)
    key = job_key(str(body.metadata.namespace), str(body.metadata.name))
    if ttl_expired(body.spec, body.status, ctx.clock()):
        logger.info("removed by ttlSecondsAfterFinished: job %s stays in the store", key)
        return
    attempts, limit = retry + 1, ctx.settings.cleanup_attempts
    try:
        removed = ctx.store.delete_job(key)
    except StoreUnavailable as exc:
        if attempts >= limit:
            message = (
                f"gave up removing job {key} from the store after {attempts} attempts ({exc}); "
                f"its keys stay until removed by hand"
            )
            logger.warning(message)
            ctx.events.warn(body, reason=Reason.CLEANUP_SKIPPED, message=message)
            return
        raise kopf.TemporaryError(
            f"store unavailable (attempt {attempts} of {limit}): {exc}",
            delay=ctx.settings.cleanup_retry_delay,
        ) from exc
    logger.info("removed job %s from the store (%d keys)", key, removed)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", registry=registry)(on_delete)
