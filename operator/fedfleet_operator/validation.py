"""From an FLJob object as the API server stores it to a validated :class:`FLJob`, or a reason.

The CRD's OpenAPI schema (generated from the same pydantic models) catches ranges and types at
admission; what it cannot express — ``FLJobSpec``'s cross-field checks, and names too long or
dotted to name a Service — is caught here, once, for the create, update and status handlers
alike, so the ``Invalid`` condition they write carries the same message and never flaps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedfleet.core.spec import API_VERSION, KIND, FLJob, ManifestError, parse_manifest
from fedfleet_operator.naming import name_problem

__all__ = ["InvalidJob", "job_from_body", "manifest_of"]


class InvalidJob(ValueError):
    """The object cannot run; ``str(exc)`` is the message for the ``Invalid`` condition."""


def manifest_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest ``parse_manifest`` reads: only name and namespace of the metadata (never
    uid, managedFields or kopf's annotations), and the spec as stored."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": dict(body.get("spec") or {}),
    }


def job_from_body(body: Mapping[str, Any]) -> FLJob:
    """The validated job, or :class:`InvalidJob` naming every problem (``; ``-separated)."""
    manifest = manifest_of(body)
    problems: list[str] = []
    name = manifest["metadata"]["name"]
    if isinstance(name, str):
        problem = name_problem(name)
        if problem is not None:
            problems.append(problem)
    if not manifest["metadata"]["namespace"]:
        problems.append("metadata.namespace: an FLJob must live in a namespace")
    try:
        job = parse_manifest(manifest)
    except ManifestError as exc:
        problems.extend(exc.problems)
    if problems:
        raise InvalidJob("; ".join(problems))
    return job
