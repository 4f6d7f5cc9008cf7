"""The few Kubernetes API calls the handlers make, behind a small Protocol.

Handlers need a few things: make a child look like its body (create it, or patch it if it
exists), delete a child, read the job Secret back (its job secret is created once and kept),
write an FLJob's status from the status timer, delete a finished FLJob whose
``ttlSecondsAfterFinished`` passed, and resize the aggregator pool (a Deployment's replicas,
and the deletion cost of the pod a scale-down removes: :mod:`.pool`); and for FLPopulations,
read one (does a job's population exist?), list a namespace's FLJobs, patch the selectors of
the jobs that were there first, and write its status.
:class:`ChildClient` names exactly those; :class:`KubeClient` implements them with the official
client, and unit tests pass a recording fake instead of a cluster.

The status timer writes the status itself rather than through kopf's patch: kopf applies a
timer's patch after the handler returned, outside of it, and a failed patch there ends the
timer for that object for good (see :mod:`fedfleet_operator.handlers.status`). A write here
fails inside the handler, which kopf retries.

Calls are synchronous: kopf runs sync handlers in its thread pool, and the official client's
synchronous API is the one stable across the versions fedfleet supports. Each call carries a
timeout (``FEDFLEET_API_TIMEOUT``) so a stuck API server fails the handler, which kopf retries.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Final, Protocol

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from fedfleet_operator.naming import GROUP, PLURAL, VERSION

__all__ = ["FIELD_MANAGER", "ChildClient", "KubeClient", "StatusWriteError", "load_api_client"]

FIELD_MANAGER: Final = "fedfleet-operator"
"""Field manager recorded in managedFields for everything the operator writes."""

_CONFLICT, _NOT_FOUND = 409, 404
_FLJOB: Final = (GROUP, VERSION, PLURAL)
_FLPOPULATION: Final = (GROUP, VERSION, "flpopulations")


class StatusWriteError(RuntimeError):
    """A status write did not land: the object changed since it was read (409), or the API
    server refused or could not be reached. The caller tries again with a fresh read."""


_API_OF_KIND: Final = {
    "ConfigMap": ("core", "config_map"),
    "Secret": ("core", "secret"),
    "Service": ("core", "service"),
    "Deployment": ("apps", "deployment"),
}
"""Kind -> (API group client, method suffix): ``create_namespaced_<suffix>`` and friends."""


class ChildClient(Protocol):
    """What the handlers do to an FLJob's children."""

    def apply(self, body: Mapping[str, Any]) -> None:
        """Create the object, or patch it to the body if it exists (idempotent)."""
        ...

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete an object; False when it was already gone."""
        ...

    def patch_existing(self, body: Mapping[str, Any]) -> bool:
        """Strategic-merge patch an object that exists (never create it: the body may be a
        fragment); False when it does not exist."""
        ...

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded; ``None`` when it does not exist."""
        ...

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None
    ) -> None:
        """Merge ``status`` into an FLJob's status, only if the object is still at
        ``resource_version`` (when given); :class:`StatusWriteError` otherwise."""
        ...

    def delete_fljob(self, namespace: str, name: str) -> bool:
        """Delete an FLJob; False when it was already gone."""
        ...

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set a Deployment's replicas (the aggregator pool)."""
        ...

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> bool:
        """Merge annotations into a pod's (the pod-deletion cost of an aggregator about to be
        removed); False when the pod is gone."""
        ...

    def read_population(self, namespace: str, name: str) -> dict[str, Any] | None:
        """An FLPopulation as a dict; ``None`` when it (or its CRD) does not exist."""
        ...

    def list_fljobs(self, namespace: str) -> list[dict[str, Any]]:
        """The FLJobs of a namespace, as dicts (an FLPopulation's ``status.jobs``)."""
        ...

    def patch_population_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge ``status`` into an FLPopulation's; :class:`StatusWriteError` if refused."""
        ...


def load_api_client() -> client.ApiClient:
    """An API client from the pod's service account, else from the kubeconfig (development,
    the test cluster). kopf logs in separately with the same sources."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return client.ApiClient(configuration)


class KubeClient:
    """:class:`ChildClient` over the official client's CoreV1Api and AppsV1Api."""

    def __init__(self, api_client: client.ApiClient, *, timeout: float) -> None:
        self._apis: dict[str, Any] = {
            "core": client.CoreV1Api(api_client),
            "apps": client.AppsV1Api(api_client),
        }
        self._timeout = timeout
        self._custom = client.CustomObjectsApi(api_client)

    def _method(self, verb: str, kind: str) -> Any:
        try:
            group, suffix = _API_OF_KIND[kind]
        except KeyError:
            raise ValueError(f"the operator does not manage {kind} objects") from None
        return getattr(self._apis[group], f"{verb}_namespaced_{suffix}")

    def apply(self, body: Mapping[str, Any]) -> None:
        kind, meta = str(body["kind"]), body["metadata"]
        name, namespace = str(meta["name"]), str(meta["namespace"])
        try:
            self._method("create", kind)(
                namespace=namespace,
                body=dict(body),
                field_manager=FIELD_MANAGER,
                _request_timeout=self._timeout,
            )
            return
        except ApiException as exc:
            if exc.status != _CONFLICT:
                raise
        # It exists: a strategic-merge patch to the same body (merge by name for containers,
        # env and ports) converges it without a read, and rolls the pods only if the pod
        # template changed.
        self._method("patch", kind)(
            name=name,
            namespace=namespace,
            body=dict(body),
            field_manager=FIELD_MANAGER,
            _request_timeout=self._timeout,
        )

    def patch_existing(self, body: Mapping[str, Any]) -> bool:
        kind, meta = str(body["kind"]), body["metadata"]
        try:
            self._method("patch", kind)(
                name=str(meta["name"]),
                namespace=str(meta["namespace"]),
                body=dict(body),
                field_manager=FIELD_MANAGER,
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status == _NOT_FOUND:
                return False
            raise
        return True

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        try:
            self._method("delete", kind)(
                name=name,
                namespace=namespace,
                propagation_policy="Background",
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status == _NOT_FOUND:
                return False
            raise
        return True

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            secret = self._apis["core"].read_namespaced_secret(
                name=name, namespace=namespace, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == _NOT_FOUND:
                return None
            raise
        out: dict[str, str] = {}
        for key, value in (getattr(secret, "data", None) or {}).items():
            try:
                out[str(key)] = base64.b64decode(value).decode()
            except (binascii.Error, UnicodeDecodeError):
                continue  # not ours to interpret; the caller replaces what it needs
        return out

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None
    ) -> None:
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            # A precondition in a merge patch: the API server answers 409 if the object moved
            # on, so a slow write can never put older news over newer.
            body["metadata"] = {"resourceVersion": resource_version}
        group, version, plural = _FLJOB
        try:
            self._custom.patch_namespaced_custom_object_status(
                group,
                version,
                namespace,
                plural,
                name,
                body,
                field_manager=FIELD_MANAGER,
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            raise StatusWriteError(
                f"status of {namespace}/{name}: {exc.status} {exc.reason}"
            ) from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise StatusWriteError(f"status of {namespace}/{name}: {exc}") from exc

    def delete_fljob(self, namespace: str, name: str) -> bool:
        group, version, plural = _FLJOB
        try:
            self._custom.delete_namespaced_custom_object(
                group,
                version,
                namespace,
                plural,
                name,
                propagation_policy="Background",
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status == _NOT_FOUND:
                return False
            raise
        return True

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        self._apis["apps"].patch_namespaced_deployment(
            name=name,
            namespace=namespace,
            body={"spec": {"replicas": int(replicas)}},
            field_manager=FIELD_MANAGER,
            _request_timeout=self._timeout,
        )

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> bool:
        try:
            self._apis["core"].patch_namespaced_pod(
                name=name,
                namespace=namespace,
                body={"metadata": {"annotations": dict(annotations)}},
                field_manager=FIELD_MANAGER,
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status == _NOT_FOUND:
                return False
            raise
        return True

    def read_population(self, namespace: str, name: str) -> dict[str, Any] | None:
        group, version, plural = _FLPOPULATION
        try:
            obj = self._custom.get_namespaced_custom_object(
                group, version, namespace, plural, name, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == _NOT_FOUND:  # no such population, or no FLPopulation CRD
                return None
            raise
        return dict(obj) if isinstance(obj, Mapping) else None

    def list_fljobs(self, namespace: str) -> list[dict[str, Any]]:
        group, version, plural = _FLJOB
        listing = self._custom.list_namespaced_custom_object(
            group, version, namespace, plural, _request_timeout=self._timeout
        )
        items = listing.get("items") if isinstance(listing, Mapping) else None
        return [dict(item) for item in items or [] if isinstance(item, Mapping)]

    def patch_population_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        group, version, plural = _FLPOPULATION
        try:
            self._custom.patch_namespaced_custom_object_status(
                group,
                version,
                namespace,
                plural,
                name,
                {"status": dict(status)},
                field_manager=FIELD_MANAGER,
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            raise StatusWriteError(
                f"status of FLPopulation {namespace}/{name}: {exc.status} {exc.reason}"
            ) from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise StatusWriteError(f"status of FLPopulation {namespace}/{name}: {exc}") from exc
