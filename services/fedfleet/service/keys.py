"""Keys derived from the one job secret (a Kubernetes Secret in a deployment).

One secret is provisioned per job; each use gets its own key (HMAC-SHA256 with a label) so a
leaked device token reveals nothing about report tickets or the actors' internal credential.

* **device tokens** — a device authenticates its check-ins with ``Bearer <token>`` where the
  token is ``HMAC(device_key, device_id)``, issued at enrollment;
* **report tickets** — bind a report to (job, attempt, device); checked by aggregators;
* **internal token** — selectors present it to aggregators.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ["JobKeys", "load_secret", "new_secret"]


def _derive(secret: bytes, label: str) -> bytes:
    return hmac.new(secret, label.encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class JobKeys:
    ticket_key: bytes
    device_key: bytes
    internal_token: str

    @classmethod
    def from_secret(cls, secret: bytes) -> JobKeys:
        if len(secret) < 16:
            raise ValueError("the job secret must hold at least 16 bytes")
        return cls(
            ticket_key=_derive(secret, "fedfleet/ticket"),
            device_key=_derive(secret, "fedfleet/device"),
            internal_token=_derive(secret, "fedfleet/internal").hex(),
        )

    def device_token(self, device_id: str) -> str:
        return hmac.new(self.device_key, device_id.encode(), hashlib.sha256).hexdigest()

    def device_ok(self, device_id: str, token: str) -> bool:
        return hmac.compare_digest(self.device_token(device_id), token)

    def internal_ok(self, token: str) -> bool:
        return hmac.compare_digest(self.internal_token, token)


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def load_secret(path: str | None) -> bytes:
    """Read the job secret: a file (a mounted Secret) or ``FEDFLEET_JOB_SECRET`` (hex)."""
    if path:
        raw = Path(path).read_bytes().strip()
        try:
            return bytes.fromhex(raw.decode())
        except (UnicodeDecodeError, ValueError):
            return raw
    env = os.environ.get("FEDFLEET_JOB_SECRET")
    if env:
        return bytes.fromhex(env)
    raise ValueError("no job secret: pass --secret-file or set FEDFLEET_JOB_SECRET (hex)")
