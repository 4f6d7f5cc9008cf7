"""``@kopf.on.delete`` under the finalizer ``fedfleet.dev/cleanup``: remove the job's keys.

The children go by garbage collection (they are owned by the FLJob); what Kubernetes cannot
remove is the job's state in the store — rounds, the committed-model pointer, metrics — under
the key ``<namespace>/<name>``. ``store.delete_job(key)`` removes it. The stored models (in
Redis beside the job's keys, a directory or a bucket: ``spec.checkpoints.storage``) stay, still
fetchable with ``fedfleet fetch-model``, unless ``spec.checkpoints.deleteWithJob`` is true: then
they go first (S3 models need the credentials in the operator's environment).

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

from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from fedfleet.core.model_history import CheckpointsSpec
from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.history import ModelStorageError, storage_for
from fedfleet_operator.conditions import Reason
from fedfleet_operator.context import context_of
from fedfleet_operator.lifetime import ttl_expired
from fedfleet_operator.naming import GROUP, PLURAL, VERSION, job_key
from fedfleet_operator.settings import OperatorSettings

__all__ = ["delete_stored_job", "on_delete", "register"]


def delete_stored_job(store: Store, key: str, spec: Mapping[str, Any]) -> tuple[int, int]:
    """Remove the job's record, and its models when ``spec.checkpoints.deleteWithJob``:
    (keys removed, models removed). Models go first, so a retry after a failure finds the
    record that says where they are. A spec that does not parse keeps the models."""
    try:
        policy = CheckpointsSpec.model_validate(dict(spec.get("checkpoints") or {}))
    except ValidationError:
        policy = CheckpointsSpec()
    models_removed = 0
    if policy.delete_with_job:
        models = storage_for(policy, store)
        try:
            models_removed = models.delete_job(key)
        finally:
            models.close()
    return store.delete_job(key), models_removed


def on_delete(body: kopf.Body, retry: int, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    ctx = context_of(memo)
    key = job_key(str(body.metadata.namespace), str(body.metadata.name))
    if ttl_expired(body.spec, body.status, ctx.clock()):
        logger.info("removed by ttlSecondsAfterFinished: job %s stays in the store", key)
        return
    attempts, limit = retry + 1, ctx.settings.cleanup_attempts
    try:
        removed, models = delete_stored_job(ctx.store, key, body.spec)
    except (StoreUnavailable, ModelStorageError) as exc:
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
    logger.info("removed job %s from the store (%d keys, %d stored models)", key, removed, models)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", registry=registry)(on_delete)
