"""Where committed models' bytes live: one small interface, three backends.

A job's models are immutable objects named by version and content hash
(``v00000042-<sha256 prefix>.ckpt``) under the job's folder ``<namespace>/<name>/``
(``_/<name>/`` without a namespace), beside an ``index.json`` naming the kept versions and
the best one, so the models stay fetchable after the job's store record is gone. The store's
committed-checkpoint pointer holds a small :class:`ModelRef` to the object instead of the
bytes; :meth:`ModelStorage.put` returns only once the bytes are durable, and only then is the
pointer committed, so a failed write leaves the previous version committed and intact. Two
masters racing for one version write two objects with different hashes: the loser's is never
referenced.

Backends: :mod:`.redis_models` (the job's store, the default), :mod:`.files` (a directory or
PVC), :mod:`.s3` (an S3-compatible bucket). Each is held to ``tests/contract/test_model_storage``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

__all__ = [
    "INDEX",
    "REF_MAGIC",
    "ModelMissing",
    "ModelRef",
    "ModelStorage",
    "ModelStorageError",
    "check_job",
    "check_name",
    "job_path",
    "object_name",
    "version_of",
]

REF_MAGIC: Final = b"FFREF1\n"
"""Start of a pointer that names a stored object (a checkpoint itself starts ``FFS1``)."""
INDEX: Final = "index.json"
_NAME = re.compile(r"^v(\d{8,12})-([0-9a-f]{16})\.ckpt$")
_ARCHIVED_INDEX = re.compile(r"^index-\d{8}T\d{6}Z\.json$")
_JOB = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z]([-a-z0-9]*[a-z0-9])?$")


class ModelStorageError(RuntimeError):
    """The backend failed to store or read bytes (nothing was committed)."""


class ModelMissing(ModelStorageError, KeyError):
    """No such object (pruned, never written, or another job's)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model missing"


def check_job(job: str) -> str:
    """A job key ``<namespace>/<name>`` (or ``<name>`` outside Kubernetes): it becomes a
    path, so nothing else is accepted."""
    if not _JOB.match(job):
        raise ValueError(f"job key {job!r} is not <namespace>/<name> (DNS labels)")
    return job


def job_path(job: str) -> str:
    """The job's folder: ``<namespace>/<name>``, or ``_/<name>`` for a job without a namespace
    (``_`` is no namespace's name, so the two never meet)."""
    return check_job(job) if "/" in job else f"_/{check_job(job)}"


def check_name(name: str) -> str:
    if not (_NAME.match(name) or name == INDEX or _ARCHIVED_INDEX.match(name)):
        raise ValueError(f"not a model object name: {name!r}")
    return name


def object_name(version: int, data: bytes) -> str:
    return f"v{version:08d}-{hashlib.sha256(data).hexdigest()[:16]}.ckpt"


def version_of(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m[1]) if m else None


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What the store's pointer holds for a committed model: where and what to expect."""

    location: dict[str, Any]
    """The backend's :meth:`ModelStorage.location` (never a secret)."""
    job: str
    object: str
    sha256: str
    size: int

    def encode(self) -> bytes:
        doc = {
            "location": self.location,
            "job": self.job,
            "object": self.object,
            "sha256": self.sha256,
            "size": self.size,
        }
        return REF_MAGIC + json.dumps(doc, sort_keys=True).encode()

    @staticmethod
    def is_ref(data: bytes) -> bool:
        return data.startswith(REF_MAGIC)

    @classmethod
    def decode(cls, data: bytes) -> ModelRef:
        try:
            doc = json.loads(data[len(REF_MAGIC) :])
            ref = cls(
                dict(doc["location"]),
                check_job(str(doc["job"])),
                check_name(str(doc["object"])),
                str(doc["sha256"]),
                int(doc["size"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelStorageError(f"unreadable model reference in the store: {exc}") from exc
        return ref

    def check(self, data: bytes) -> bytes:
        """The bytes, if they are the ones committed (size and SHA-256)."""
        if len(data) != self.size or hashlib.sha256(data).hexdigest() != self.sha256:
            raise ModelStorageError(
                f"{self.job}/{self.object}: stored bytes do not match the committed hash"
            )
        return data


@runtime_checkable
class ModelStorage(Protocol):
    """Immutable named objects per job. Names are checked with :func:`check_name`."""

    def location(self) -> dict[str, Any]:
        """How to reopen this backend (``kind`` and where; never a credential)."""
        ...

    def describe(self) -> str:
        """Where, for messages (no credential)."""
        ...

    def put(self, job: str, name: str, data: bytes) -> None:
        """Store the object; returns only when it is durable (raise ModelStorageError)."""
        ...

    def get(self, job: str, name: str) -> bytes:
        """The object's bytes (ModelMissing if absent)."""
        ...

    def delete(self, job: str, name: str) -> None:
        """Remove the object if it exists."""
        ...

    def names(self, job: str) -> list[str]:
        """Every object name of the job, sorted."""
        ...

    def delete_job(self, job: str) -> int:
        """Remove every object of the job; returns how many."""
        ...

    def close(self) -> None: ...
