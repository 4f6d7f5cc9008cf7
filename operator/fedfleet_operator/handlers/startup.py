"""``@kopf.on.startup``: kopf's settings per ``operator/CONTRACT.md``; login; a probe.

- finalizer ``fedfleet.dev/cleanup`` (kopf's default names zalando.org);
- handler progress and the last-handled configuration in annotations prefixed
  ``fedfleet.dev``: the CRD's structural schema would prune them from ``.status``, and
  ``.status`` belongs to the job's progress;
- Events posted, reported as ``fedfleet-operator`` by this pod;
- ClusterKopfPeering named ``FEDFLEET_PEERING``, even when watching a few namespaces only: one
  peering object for every replica, and the ClusterRole grants exactly that;
- watch streams re-established every ten minutes, so a silently dead connection (a load
  balancer dropping idle streams) cannot freeze the operator.

The operator's handlers live in a registry of their own, which (unlike kopf's default one) has
no login handlers, so :func:`login` registers kopf's client-library login: the pod's service
account, else the kubeconfig, the same sources :func:`~fedfleet_operator.kube.load_api_client`
uses for the handlers' own client.

The probe reports on the liveness endpoint whether the store answers. It never raises: a Redis
outage is not a reason for Kubernetes to restart the operator, which could do nothing better.
"""

from __future__ import annotations

from typing import Any, Final

import kopf

from fedfleet.store.base import StoreUnavailable
from fedfleet_operator.context import context_of
from fedfleet_operator.naming import FINALIZER, MANAGED_BY, PREFIX
from fedfleet_operator.settings import OperatorSettings

__all__ = ["DIFFBASE_KEY", "configure", "configure_kopf", "login", "probe_store", "register"]

DIFFBASE_KEY: Final = "last-handled-configuration"
_PROBE_KEY: Final = "fedfleet-operator/probe"
"""A job key no FLJob can have (names cannot contain '/'): reading it is a cheap round trip."""


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """Apply the contract's kopf settings to ``kopf_settings`` (also used by tests)."""
    persistence = kopf_settings.persistence
    persistence.finalizer = FINALIZER
    persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key=DIFFBASE_KEY)
    kopf_settings.posting.enabled = True
    kopf_settings.posting.reporting_component = MANAGED_BY
    kopf_settings.posting.reporting_instance = settings.pod_name
    kopf_settings.posting.event_name_prefix = "fedfleet-"
    kopf_settings.peering.name = settings.peering
    kopf_settings.peering.clusterwide = True
    kopf_settings.peering.priority = settings.priority
    kopf_settings.watching.server_timeout = 600
    kopf_settings.watching.client_timeout = 660
    kopf_settings.watching.connect_timeout = 30


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure_kopf(settings, context_of(memo).settings)


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


def probe_store(memo: kopf.Memo, **_: Any) -> str:
    try:
        context_of(memo).store.job_state(_PROBE_KEY)
    except StoreUnavailable as exc:
        return f"unavailable: {exc}"
    return "ok"


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    kopf.on.login(id="login", registry=registry)(login)
    kopf.on.startup(id="configure", registry=registry)(configure)
    kopf.on.probe(id="store", registry=registry)(probe_store)
