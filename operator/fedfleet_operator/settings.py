"""The operator's configuration, read once from its pod's environment.

Every knob of ``operator/CONTRACT.md`` ("Operator configuration") is one field here, with its
unit and the reason for its default, in the manner of kopf's own ``configuration.py``. Builders
and handlers receive an :class:`OperatorSettings`; nothing else reads the environment.

Store URLs may carry a password (``redis://:secret@host:6379/0``). Actor pods must never see
it in plain text in a Deployment, so :attr:`OperatorSettings.actor_store_url` drops it and
:attr:`OperatorSettings.job_redis_password` hands it to the job's Secret instead.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "PULL_POLICIES",
    "OperatorSettings",
    "SettingsError",
    "peering_priority",
    "redact_store_url",
    "split_store_url",
]

PULL_POLICIES: Final = ("Always", "IfNotPresent", "Never")
"""Values Kubernetes accepts for ``imagePullPolicy``."""


class SettingsError(ValueError):
    """An environment variable of the operator holds a value it cannot use."""


def split_store_url(url: str) -> tuple[str, str | None]:
    """The URL without its password, and the password (``None`` when the URL has none).

    A user name (Redis ACL) stays in the URL: the actors combine it with the password they get
    from ``FEDFLEET_REDIS_PASSWORD``, which ``RedisStore.from_url`` reads when the URL has none.
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), (
        parts.password
    )


def redact_store_url(url: str) -> str:
    """The URL as it may appear in status, logs and events: never with a password."""
    return split_store_url(url)[0]


def peering_priority(identity: str) -> int:
    """A stable kopf peering priority from the pod's name.

    kopf pauses an operator that sees a peer with a higher or equal priority; replicas of one
    Deployment need distinct values, and hashing the pod name gives them without coordination.
    """
    digest = hashlib.sha256(identity.encode()).digest()
    return 1 + int.from_bytes(digest[:4], "big") % 1_000_000


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number of seconds") from None
    if not value > minimum:
        raise SettingsError(f"{name}={raw!r}: must be greater than {minimum:g}")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if value < 1:
        raise SettingsError(f"{name}={raw!r}: must be at least 1")
    return value


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """Configuration of one operator process; see :meth:`from_env` for the variable names."""

    store_url: str
    """``FEDFLEET_STORE_URL`` (required): the Redis every job's actors share, and that the
    operator reads progress from, e.g. ``redis://10.0.0.12:6379/0``. There is no default: an
    operator guessing a Redis would report every job as Pending forever."""

    redis_password: str = ""
    """``FEDFLEET_REDIS_PASSWORD``: copied into each job's Secret (key ``redis-password``).
    Empty means the URL's own password, or none."""

    actor_image: str | None = None
    """``FEDFLEET_ACTOR_IMAGE``: image of the actor pods of jobs without their own
    ``spec.actors.image`` (a task image); a chart sets it so they run the release it
    installed. Unset: ``fedfleet/services:0.1.0``."""

    image_pull_policy: str = "IfNotPresent"
    """``FEDFLEET_ACTOR_IMAGE_PULL_POLICY``: ``imagePullPolicy`` of actor containers.
    ``IfNotPresent`` because release images are immutable tags."""

    namespaces: tuple[str, ...] = ()
    """``FEDFLEET_NAMESPACES`` (comma-separated): namespaces to watch. Empty means the whole
    cluster, which is what the ClusterRole of the chart grants."""

    peering: str = "fedfleet"
    """``FEDFLEET_PEERING``: name of the ClusterKopfPeering shared by the operator's replicas,
    so only one of them (the highest priority) handles FLJobs at a time."""

    status_interval: float = 5.0
    """``FEDFLEET_STATUS_INTERVAL`` (seconds) between two reads of a job's progress from the
    store. Rounds take tens of seconds, so 5 s keeps ``kubectl get flj`` current without
    loading Redis or the API server."""

    actor_tick_seconds: float = 0.5
    """``FEDFLEET_ACTOR_TICK_SECONDS``: passed to actors as ``FEDFLEET_TICK_SECONDS``, the
    period of their control loop (the actors' own default)."""

    lease_ttl: float = 10.0
    """``FEDFLEET_LEASE_TTL`` (seconds): passed to actors as ``FEDFLEET_LEASE_TTL``, how long a
    coordinator's lease outlives its last renewal (the standby takes over after it)."""

    pod_name: str = ""
    """``POD_NAME`` (downward API): the kopf peering identity and the source of the peering
    priority. Falls back to the host name outside Kubernetes."""

    cleanup_attempts: int = 12
    """``FEDFLEET_CLEANUP_ATTEMPTS``: how often deleting an FLJob retries removing its keys
    from an unreachable store before it gives up (with a Warning event) and lets the object go.
    12 attempts x :attr:`cleanup_retry_delay` is about two minutes: long enough to ride out a
    Redis restart, short enough that a dead Redis never blocks namespace deletion."""

    cleanup_retry_delay: float = 10.0
    """``FEDFLEET_CLEANUP_RETRY_DELAY`` (seconds) between two such attempts."""

    api_timeout: float = 30.0
    """``FEDFLEET_API_TIMEOUT`` (seconds): timeout of each Kubernetes API request the
    operator's handlers make, so a stuck API server fails a handler (kopf retries it) instead
    of hanging a worker thread."""

    def __post_init__(self) -> None:
        if not self.store_url:
            raise SettingsError("FEDFLEET_STORE_URL is required (e.g. redis://redis:6379/0)")
        if self.image_pull_policy not in PULL_POLICIES:
            raise SettingsError(
                f"FEDFLEET_ACTOR_IMAGE_PULL_POLICY={self.image_pull_policy!r}: "
                f"expected one of {', '.join(PULL_POLICIES)}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read the settings from ``env`` (default: ``os.environ``); :class:`SettingsError`
        names the variable when a value is unusable."""
        env = os.environ if env is None else env
        namespaces = tuple(
            ns.strip() for ns in env.get("FEDFLEET_NAMESPACES", "").split(",") if ns.strip()
        )
        return cls(
            store_url=env.get("FEDFLEET_STORE_URL", "").strip(),
            redis_password=env.get("FEDFLEET_REDIS_PASSWORD", ""),
            actor_image=env.get("FEDFLEET_ACTOR_IMAGE", "").strip() or None,
            image_pull_policy=env.get("FEDFLEET_ACTOR_IMAGE_PULL_POLICY", "").strip()
            or "IfNotPresent",
            namespaces=namespaces,
            peering=env.get("FEDFLEET_PEERING", "").strip() or "fedfleet",
            status_interval=_float(env, "FEDFLEET_STATUS_INTERVAL", 5.0),
            actor_tick_seconds=_float(env, "FEDFLEET_ACTOR_TICK_SECONDS", 0.5),
            lease_ttl=_float(env, "FEDFLEET_LEASE_TTL", 10.0),
            pod_name=env.get("POD_NAME", "").strip() or socket.gethostname(),
            cleanup_attempts=_int(env, "FEDFLEET_CLEANUP_ATTEMPTS", 12),
            cleanup_retry_delay=_float(env, "FEDFLEET_CLEANUP_RETRY_DELAY", 10.0),
            api_timeout=_float(env, "FEDFLEET_API_TIMEOUT", 30.0),
        )

    @property
    def clusterwide(self) -> bool:
        """Whether the operator watches every namespace (no ``FEDFLEET_NAMESPACES``)."""
        return not self.namespaces

    @property
    def actor_store_url(self) -> str:
        """The store URL written literally into actor Deployments: without a password."""
        return split_store_url(self.store_url)[0]

    @property
    def job_redis_password(self) -> str:
        """The password each job's Secret carries: the explicit one, else the URL's."""
        return self.redis_password or (split_store_url(self.store_url)[1] or "")

    @property
    def priority(self) -> int:
        """This replica's kopf peering priority (see :func:`peering_priority`)."""
        return peering_priority(self.pod_name)
