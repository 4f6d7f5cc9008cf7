"""``@kopf.on.delete`` under the finalizer ``fedfleet.dev/cleanup``: remove the job's keys.

The children go by garbage collection (they are owned by the FLJob); what Kubernetes cannot
remove is the job's state in the store — rounds, the committed-model pointer, metrics — under
the key ``<namespace>/<name>``. ``store.delete_job(key)`` removes it. The stored models (in
Redis beside the job's keys, a directory or a bucket: ``spec.checkpoints.storage``) stay, still
fetchable with ``fedfleet fetch-model``, unless ``spec.checkpoints.deleteWithJob`` is true: then
they go first. S3 models are deleted with the credentials of the Secret the job names
(``storage.credentialsSecret``, read in the job's namespace), or the operator's environment's.
Models on a filesystem (a PVC) stay even then: the volume is mounted in the job's pods, never in
the operator, and a Warning Event says where they are.

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

from collections.abc import Callable, Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from fedfleet.core.model_history import CheckpointsSpec, StorageKind
from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.history import ModelStorageError, storage_for
from fedfleet_operator.conditions import Reason
from fedfleet_operator.context import context_of
from fedfleet_operator.lifetime import ttl_expired
from fedfleet_operator.naming import GROUP, PLURAL, VERSION, job_key
from fedfleet_operator.settings import OperatorSettings

__all__ = ["delete_stored_job", "models_out_of_reach", "on_delete", "register"]

SecretReader = Callable[[str], Mapping[str, str] | None]
"""A Secret's decoded data by name, in the job's namespace (None when it does not exist)."""


def _policy(spec: Mapping[str, Any]) -> CheckpointsSpec | None:
    try:
        return CheckpointsSpec.model_validate(dict(spec.get("checkpoints") or {}))
    except ValidationError:
        return None


def models_out_of_reach(spec: Mapping[str, Any]) -> str | None:
    """Why the job's models stay although ``deleteWithJob`` asks for them to go (None if they
    can go, or are meant to stay): a filesystem is mounted in the job's pods, not the operator."""
    policy = _policy(spec)
    if policy is None or not policy.delete_with_job:
        return None
    storage = policy.storage
    if storage.kind is not StorageKind.filesystem:
        return None
    where = f"{storage.path}" + (f" on PVC {storage.claim_name}" if storage.claim_name else "")
    return (
        f"spec.checkpoints.deleteWithJob: the models in {where} stay, because that volume is "
        "mounted in the job's pods and never in the operator; delete them there"
    )


def _s3_credentials(
    policy: CheckpointsSpec, read_secret: SecretReader | None
) -> tuple[str, str, str | None] | None:
    """The credentials of ``storage.credentialsSecret`` (None: the operator's environment)."""
    name = policy.storage.credentials_secret
    if name is None or read_secret is None:
        return None
    data = read_secret(name)
    if data is None:
        raise ModelStorageError(f"S3 credentials Secret {name!r} not found")
    key, secret = data.get("accessKeyId"), data.get("secretAccessKey")
    if not key or not secret:
        raise ModelStorageError(
            f"S3 credentials Secret {name!r} lacks accessKeyId or secretAccessKey"
        )
    return key, secret, data.get("sessionToken") or None


def delete_stored_job(
    store: Store, key: str, spec: Mapping[str, Any], read_secret: SecretReader | None = None
) -> tuple[int, int]:
    """Remove the job's record, and its models when ``spec.checkpoints.deleteWithJob``:
    (keys removed, models removed). Models go first, so a retry after a failure finds the
    record that says where they are. A spec that does not parse keeps the models, and so does
    a filesystem the operator cannot reach (:func:`models_out_of_reach`)."""
    policy = _policy(spec) or CheckpointsSpec()
    models_removed = 0
    if policy.delete_with_job and policy.storage.kind is not StorageKind.filesystem:
        credentials = (
            _s3_credentials(policy, read_secret) if policy.storage.kind is StorageKind.s3 else None
        )
        models = storage_for(policy, store, credentials)
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
    namespace = str(body.metadata.namespace)
    try:
        removed, models = delete_stored_job(
            ctx.store, key, body.spec, lambda name: ctx.kube.read_secret(namespace, name)
        )
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
            f"store or model storage unavailable (attempt {attempts} of {limit}): {exc}",
            delay=ctx.settings.cleanup_retry_delay,
        ) from exc
    logger.info("removed job %s from the store (%d keys, %d stored models)", key, removed, models)
    if (kept := models_out_of_reach(body.spec)) is not None:
        logger.warning("job %s: %s", key, kept)
        ctx.events.warn(body, reason=Reason.MODELS_KEPT, message=kept)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", registry=registry)(on_delete)
