"""Settings every actor service is started with (CLI flags, with environment fallbacks)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedfleet.core.spec import FLJob, load_manifest

__all__ = ["ServiceSettings"]


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    manifest: Path
    """The FLJob manifest (a mounted ConfigMap in a deployment)."""
    store_url: str
    """Where shared state lives: redis://, rediss:// (password from the URL or
    FEDFLEET_REDIS_PASSWORD), or memory:// (single-process tests only)."""
    secret_file: str | None
    """File with the job secret (a mounted Secret); FEDFLEET_JOB_SECRET (hex) otherwise."""
    actor_id: str
    """This actor's identity in the store; unique per job and role (the pod name)."""
    host: str = "127.0.0.1"
    port: int = 8080
    advertise: str = ""
    """URL other actors use to reach this one; defaults to http://host:port."""
    tick_seconds: float = 0.5
    """How often the actor exchanges state with the store."""
    lease_ttl: float = 10.0
    """Coordinator lease lifetime in seconds: the failover delay after a crash."""
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        return self.advertise or f"http://{self.host}:{self.port}"

    def job(self) -> FLJob:
        return load_manifest(self.manifest.read_text())

    @staticmethod
    def env(name: str, default: str | None = None) -> str | None:
        return os.environ.get(f"FEDFLEET_{name}", default)
