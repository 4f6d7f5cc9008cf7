"""Which committed models a job keeps, and which one is its best: ``spec.checkpoints``.

A week-long job commits thousands of models; the user wants the last few and the best one, not
only the newest (which may be worse than a round three days ago). This module holds the spec of
that policy and the pure decision — given every committed round's metrics, which versions stay
and which is best — so the master aggregator (which prunes after each commit), the operator
(which names the best version in the FLJob status) and ``fedfleet fetch-model`` agree on it.
Where the bytes live (Redis, a filesystem or PVC, an S3-compatible bucket) is
:mod:`fedfleet.store.models`'s business.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "CHECKPOINT_FIELD",
    "CheckpointsSpec",
    "KeptModel",
    "MetricMode",
    "StorageKind",
    "StorageSpec",
    "best_version",
    "higher_is_better",
    "kept_models",
]

CHECKPOINT_FIELD: Final = "checkpoint"
"""Key of a committed round's metrics record naming the stored object of its model."""

_LOWER_IS_BETTER: Final = ("loss", "error", "mse", "mae", "rmse", "perplexity")


class _Spec(BaseModel):
    # the same conventions as fedfleet.core.spec (which imports this module, not the reverse)
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )


class StorageKind(StrEnum):
    redis = "redis"
    filesystem = "filesystem"
    s3 = "s3"


class MetricMode(StrEnum):
    auto = "auto"
    max = "max"
    min = "min"


class StorageSpec(_Spec):
    kind: StorageKind = StorageKind.redis
    """Where model bytes live: `redis` (the job's store; for small models, the default),
    `filesystem` (a directory, on Kubernetes a mounted PVC) or `s3` (an S3-compatible bucket).
    A version is recorded as committed only after its bytes are durable there: written,
    fsynced and renamed into place on a filesystem, the PUT completed on S3."""
    path: str | None = Field(None, min_length=1, max_length=4096, pattern=r"^/")
    """`filesystem`: absolute directory holding `<namespace>/<name>/` of every job. Every
    aggregator and selector must see the same directory (on Kubernetes: `claimName`)."""
    claim_name: str | None = Field(
        None, min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    """`filesystem` on Kubernetes: a PersistentVolumeClaim (ReadWriteMany when the job has
    more than one pod) the operator mounts at `path` in the aggregators and selectors."""
    bucket: str | None = Field(
        None, min_length=3, max_length=63, pattern=r"^[a-z0-9][-a-z0-9.]*[a-z0-9]$"
    )
    """`s3`: the bucket (it must exist)."""
    prefix: str = Field("fedfleet", max_length=512, pattern=r"^[A-Za-z0-9._/-]*$")
    """`s3`: key prefix; a job's objects are under `<prefix>/<namespace>/<name>/`."""
    endpoint: str | None = Field(None, max_length=2048, pattern=r"^https?://[^\s@]+$")
    """`s3`: endpoint URL of an S3-compatible service (default https://s3.<region>.amazonaws.com);
    path-style requests."""
    region: str = Field("us-east-1", min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")
    """`s3`: the signing region."""
    credentials_secret: str | None = Field(
        None, min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    """`s3` on Kubernetes: a Secret in the job's namespace with keys `accessKeyId` and
    `secretAccessKey`, given to the actors as `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
    (never written into the FLJob). Elsewhere those environment variables are read."""

    @model_validator(mode="after")
    def _per_kind(self) -> StorageSpec:
        if self.kind is StorageKind.filesystem and self.path is None:
            raise ValueError("checkpoints.storage.path is required for kind filesystem")
        if self.kind is StorageKind.s3 and self.bucket is None:
            raise ValueError("checkpoints.storage.bucket is required for kind s3")
        if self.kind is not StorageKind.filesystem and (self.path or self.claim_name):
            raise ValueError("checkpoints.storage.path/claimName are for kind filesystem only")
        if self.kind is not StorageKind.s3 and (
            self.bucket or self.endpoint or self.credentials_secret
        ):
            raise ValueError(
                "checkpoints.storage.bucket/endpoint/credentialsSecret are for kind s3 only"
            )
        return self


class CheckpointsSpec(_Spec):
    keep: int = Field(1, ge=1, le=100_000)
    """How many of the most recent committed models to keep (the newest is always kept)."""
    keep_best: bool = True
    """Also keep the best model by `metric`, however old; the FLJob status names it."""
    metric: str = Field("accuracy", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    """Round metric that ranks models: any key of a committed round's metrics (`accuracy`,
    `loss`, `federated_accuracy`, a task's own). Rounds without it are never best."""
    mode: MetricMode = MetricMode.auto
    """`max` (higher is better) or `min`; `auto`: `min` when the metric's name contains loss,
    error, mse, mae, rmse or perplexity, else `max`. Ties go to the newer model."""
    delete_with_job: bool = False
    """Delete the stored models when the FLJob is deleted. By default they stay (in Redis,
    the directory or the bucket), fetchable with `fedfleet fetch-model`. S3 models are deleted
    with the credentials of `storage.credentialsSecret`; models on a filesystem (a PVC) always
    stay, since the operator does not mount the job's volumes (a Warning Event says so)."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Where the models' bytes are stored."""


def higher_is_better(metric: str, mode: MetricMode = MetricMode.auto) -> bool:
    if mode is not MetricMode.auto:
        return mode is MetricMode.max
    name = metric.lower()
    return not any(word in name for word in _LOWER_IS_BETTER)


@dataclass(frozen=True, slots=True)
class KeptModel:
    version: int
    round: int
    object: str
    """The stored object's name (see :mod:`fedfleet.store.models`)."""
    value: float | None
    """The ranking metric of this version, if the round reported it."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _committed(records: Iterable[Mapping[str, Any]], metric: str) -> list[KeptModel]:
    """Versions whose metrics record names a stored object, newest version winning per number."""
    by_version: dict[int, KeptModel] = {}
    for r in records:
        name, version = r.get(CHECKPOINT_FIELD), r.get("model_version")
        if not isinstance(name, str) or not isinstance(version, int) or version < 1:
            continue
        round_ = r.get("round")
        by_version[version] = KeptModel(
            version, round_ if isinstance(round_, int) else 0, name, _number(r.get(metric))
        )
    return [by_version[v] for v in sorted(by_version)]


def best_version(
    records: Iterable[Mapping[str, Any]], metric: str, mode: MetricMode = MetricMode.auto
) -> KeptModel | None:
    """The best committed model by ``metric`` (ties: the newer), None if no round has it."""
    up = higher_is_better(metric, mode)
    best: KeptModel | None = None
    for m in _committed(records, metric):
        if m.value is None:
            continue
        if best is None or best.value is None:
            best = m
        elif (m.value >= best.value) if up else (m.value <= best.value):
            best = m
    return best


def kept_models(
    records: Iterable[Mapping[str, Any]], policy: CheckpointsSpec
) -> tuple[list[KeptModel], KeptModel | None]:
    """The models ``policy`` keeps (oldest first) and the best one (when ``keepBest``).

    ``records`` are the committed rounds' metrics in commit order (the store's metrics list);
    only those naming a stored object count.
    """
    models = list(records)
    committed = _committed(models, policy.metric)
    kept = {m.version: m for m in committed[-policy.keep :]}
    best = best_version(models, policy.metric, policy.mode) if policy.keep_best else None
    if best is not None:
        kept[best.version] = best
    return [kept[v] for v in sorted(kept)], best
