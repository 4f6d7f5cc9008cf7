"""Committing a model through its backend, keeping the history, and reading any kept version.

:func:`commit_model` is the one step the master aggregator takes instead of
``Store.commit_checkpoint``: the bytes go to the backend first (durable when it returns), then
the store commits a :class:`ModelRef` to them — the version bump, the round's metrics (with the
object's name under ``checkpoint``) and the pointer, atomically, fenced as before. Only then is
the history pruned to what ``spec.checkpoints`` keeps and ``index.json`` rewritten from the
store's metrics (the truth); a failure there is logged and repaired by the next commit.

An ``index.json`` left by an earlier job of the same name (its FLJob was deleted, the models
kept) names objects this job never committed: it is archived as ``index-<UTC time>.json`` and
none of its objects is ever pruned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from fedfleet.core.model_history import (
    CHECKPOINT_FIELD,
    CheckpointsSpec,
    KeptModel,
    StorageKind,
    higher_is_better,
    kept_models,
)
from fedfleet.store.base import Checkpoint, Store, StoreUnavailable
from fedfleet.store.history.base import (
    INDEX,
    ModelMissing,
    ModelRef,
    ModelStorage,
    ModelStorageError,
    object_name,
    version_of,
)
from fedfleet.store.history.redis_models import models_in_store

__all__ = [
    "checkpoint_bytes",
    "commit_model",
    "open_models",
    "read_index",
    "select_model",
    "storage_for",
    "update_history",
]

log = logging.getLogger(__name__)


def open_models(
    location: Mapping[str, Any],
    store: Store | None = None,
    credentials: tuple[str, str, str | None] | None = None,
) -> ModelStorage:
    """The backend a location names (S3 credentials given, or from the environment)."""
    kind = location.get("kind")
    if kind == StorageKind.filesystem:
        from fedfleet.store.history.files import FileModels

        return FileModels(str(location["path"]))
    if kind == StorageKind.s3:
        from fedfleet.store.history.s3 import S3Models

        return S3Models(
            str(location["bucket"]),
            prefix=str(location.get("prefix", "")),
            endpoint=str(location["endpoint"]) if location.get("endpoint") else None,
            region=str(location.get("region", "us-east-1")),
            credentials=credentials,
        )
    if kind == StorageKind.redis:
        if store is None:
            raise ModelStorageError("models stored in Redis need the store (--store)")
        return models_in_store(store)
    raise ModelStorageError(f"unknown model storage kind {kind!r}")


def storage_for(
    spec: CheckpointsSpec,
    store: Store,
    credentials: tuple[str, str, str | None] | None = None,
) -> ModelStorage:
    """The backend ``spec.checkpoints.storage`` names (S3: ``credentials``, or the
    environment's)."""
    s = spec.storage
    if s.kind is StorageKind.filesystem:
        return open_models({"kind": "filesystem", "path": s.path})
    if s.kind is StorageKind.s3:
        location = {
            "kind": "s3",
            "bucket": s.bucket,
            "prefix": s.prefix,
            "endpoint": s.endpoint,
            "region": s.region,
        }
        return open_models(location, credentials=credentials)
    return models_in_store(store)


def commit_model(
    store: Store,
    models: ModelStorage,
    policy: CheckpointsSpec,
    job: str,
    token: int,
    expected_version: int,
    round_: int,
    data: bytes,
    metrics: dict[str, Any],
) -> int:
    """Store ``data`` durably, then commit its reference (see the module doc); the new version.

    A backend failure raises :class:`ModelStorageError` before anything is committed.
    """
    name = object_name(expected_version + 1, data)
    models.put(job, name, data)
    ref = ModelRef(models.location(), job, name, hashlib.sha256(data).hexdigest(), len(data))
    version = store.commit_checkpoint(
        job, token, expected_version, round_, ref.encode(), {**metrics, CHECKPOINT_FIELD: name}
    )
    try:
        update_history(store, models, policy, job)
    except (ModelStorageError, StoreUnavailable, ValueError) as exc:
        log.warning("model %d of %s committed; pruning the history failed: %s", version, job, exc)
    return version


def _entry(m: KeptModel) -> dict[str, Any]:
    return {"version": m.version, "round": m.round, "object": m.object, "value": m.value}


def read_index(models: ModelStorage, job: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(models.get(job, INDEX))
    except ModelMissing:
        return None
    except ValueError as exc:
        raise ModelStorageError(f"{job}/{INDEX} in {models.describe()} is not JSON") from exc
    return doc if isinstance(doc, dict) else None


def update_history(
    store: Store, models: ModelStorage, policy: CheckpointsSpec, job: str
) -> dict[str, Any]:
    """Rewrite the job's index from the store's metrics and delete what is no longer kept."""
    records = store.metrics(job)
    kept, best = kept_models(records, policy)
    ours = {r[CHECKPOINT_FIELD] for r in records if isinstance(r.get(CHECKPOINT_FIELD), str)}
    by_version = {
        r.get("model_version"): r.get(CHECKPOINT_FIELD)
        for r in records
        if isinstance(r.get(CHECKPOINT_FIELD), str)
    }
    previous = read_index(models, job)
    if previous is not None and any(
        by_version.get(e.get("version")) != e.get("object") for e in previous.get("models", [])
    ):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        models.put(job, f"index-{stamp}.json", json.dumps(previous).encode())
    index = {
        "job": job,
        "metric": policy.metric,
        "higherIsBetter": higher_is_better(policy.metric, policy.mode),
        "latest": kept[-1].version if kept else 0,
        "best": _entry(best) if best else None,
        "models": [_entry(m) for m in kept],
    }
    models.put(job, INDEX, json.dumps(index, indent=1).encode())
    keep = {m.object for m in kept}
    newest = max((m.version for m in kept), default=0)
    for name in models.names(job):
        v = version_of(name)
        if name in ours and name not in keep and v is not None and v <= newest:
            models.delete(job, name)
    return index


def select_model(index: Mapping[str, Any], which: str) -> dict[str, Any]:
    """The index entry for ``latest``, ``best`` or a version number: ModelMissing if it is not
    kept, ValueError if ``which`` is none of these."""
    entries = [e for e in index.get("models", []) if isinstance(e, dict)]
    if which == "best":
        best = index.get("best")
        if not isinstance(best, dict):
            raise ModelMissing(f"no best model: no kept round reported {index.get('metric')!r}")
        return best
    if which == "latest":
        if not entries:
            raise ModelMissing("no model kept")
        return max(entries, key=lambda e: int(e["version"]))
    if not which.isdigit():
        raise ValueError(f"--version {which!r}: a number, 'latest' or 'best'")
    for e in entries:
        if e.get("version") == int(which):
            return e
    kept = ", ".join(str(e.get("version")) for e in entries) or "none"
    raise ModelMissing(f"version {which} is not kept (kept: {kept})")


def checkpoint_bytes(store: Store, checkpoint: Checkpoint) -> bytes:
    """The committed model's bytes: inline in the pointer, or fetched from its backend."""
    if not ModelRef.is_ref(checkpoint.data):
        return checkpoint.data
    ref = ModelRef.decode(checkpoint.data)
    models = open_models(ref.location, store)
    try:
        return ref.check(models.get(ref.job, ref.object))
    finally:
        models.close()
