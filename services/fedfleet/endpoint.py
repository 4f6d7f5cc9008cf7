"""The population endpoint that ``fedfleet up --no-fleet --state-dir DIR`` keeps for real devices.

Real devices are configured once, with a URL, a population name and an enrollment token, and
then take part in whatever jobs that population runs (Bonawitz et al. 2019, section 3). On one
machine the state directory is what makes this hold across jobs: it keeps

* ``population-secret`` (0600): the population's secret, from which the enrollment token and
  the key that signs device credentials derive (:mod:`fedfleet.service.enrollment`). Created on
  first use and never rotated here, so enrolled devices stay enrolled for the next job;
* ``endpoint.json``: ``{"url", "population", "enrollToken"}`` — what a device installer needs.
  The URL's host and port are reused by every later job started on the same directory (the
  first run picks a free port unless ``--listen`` names one);
* ``redis/``: the store's data, so revocations outlive a job.

Between two jobs the address answers nothing; devices back off and retry until the next job's
selector listens there again. A job that already ran to completion in the directory is not run
again over its own history: that is an error naming the job.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedfleet.redis_server import free_port

__all__ = ["Endpoint", "EndpointError", "load_or_create", "parse_listen"]

SECRET_FILE = "population-secret"
ENDPOINT_FILE = "endpoint.json"


class EndpointError(ValueError):
    """The state directory or the ``--listen`` address cannot be used; the message says why."""


def parse_listen(text: str | None) -> tuple[str, int] | None:
    """``HOST:PORT`` (``PORT`` 0 = any free port) -> ``(host, port)``; None passes through."""
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise EndpointError(f"--listen must be HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a population's devices reach the selector, and the secret that enrolls them."""

    directory: Path
    population: str
    host: str
    port: int
    secret: bytes

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def secret_path(self) -> Path:
        return self.directory / SECRET_FILE

    @property
    def redis_dir(self) -> Path:
        return self.directory / "redis"

    def document(self, enroll_token: str) -> dict[str, Any]:
        return {"url": self.url, "population": self.population, "enrollToken": enroll_token}

    def write(self, enroll_token: str) -> Path:
        """Write ``endpoint.json`` (0600: it holds the enrollment token) atomically."""
        path = self.directory / ENDPOINT_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.document(enroll_token), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def _previous(directory: Path) -> dict[str, Any]:
    path = directory / ENDPOINT_FILE
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EndpointError(
            f"{path} is not readable JSON ({exc}); remove it to start over"
        ) from None
    if not isinstance(doc, dict):
        raise EndpointError(f"{path} must hold a JSON object; remove it to start over")
    return doc


def _secret(directory: Path) -> bytes:
    path = directory / SECRET_FILE
    if path.exists():
        try:
            secret = bytes.fromhex(path.read_text(encoding="ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise EndpointError(f"{path} must hold the population secret as hex") from None
        if len(secret) < 16:
            raise EndpointError(f"{path} holds fewer than 16 bytes of secret")
        return secret
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret.hex() + "\n")
    return secret


def load_or_create(
    directory: Path, population: str, listen: tuple[str, int] | None = None
) -> Endpoint:
    """The endpoint kept in ``directory`` for ``population``: created on first use.

    The address is, in order: ``listen`` when given (port 0 = a free one), the one the last
    job in this directory used, or 127.0.0.1 and a free port. A directory made for another
    population is refused (its devices hold that population's credentials).
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous = _previous(directory)
    if previous and previous.get("population") != population:
        raise EndpointError(
            f"{directory} serves population {previous.get('population')!r}, this job's "
            f"population is {population!r}: use another --state-dir"
        )
    if listen is None and isinstance(previous.get("url"), str):
        parts = urlsplit(previous["url"])
        if parts.hostname and parts.port:
            listen = (parts.hostname, parts.port)
    host, port = listen or ("127.0.0.1", 0)
    if port == 0:
        port = free_port(host)
    return Endpoint(directory, population, host, port, _secret(directory))
