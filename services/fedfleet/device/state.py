"""A real device's state directory: what must survive a restart, and nothing else.

A device process (``fedfleet device run``) can be stopped, killed or rebooted at any moment. Its
identity (the device id and credential the server issued at enrollment), the next reconnect
window the server gave it and the rounds it already reported must outlive the process, or a
restarted device would enroll as a stranger, stampede the selectors at once, or report a round
twice. They live in one directory (mode 0700, per the enrollment design):

* ``identity.json`` (0600: it holds the credential) — server, population, device id, credential
  and its issue / expiry / renewal times;
* ``schedule.json`` — ``next_checkin`` (unix seconds) and ``reported``, the round keys this
  device reported most recently (written *before* an upload, so even a crash mid-upload cannot
  lead to a second report of that round);
* ``data.json`` — the sha256 of every data file ``--data`` loaded, so a restart does not load the
  same file into the Example Store again;
* ``examples.sqlite`` — the Example Store;
* ``lock`` — held with ``flock`` by the running process: two processes on one state directory
  would share an identity and a store, so the second one stops with a clear error.

Every JSON file is replaced atomically (write a temporary file, fsync, rename, fsync the
directory): a crash leaves the old or the new version, never half of one.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Identity", "StateDir", "StateError", "StateLocked", "atomic_write_json"]

REPORTED_KEPT = 256
"""How many reported round keys are remembered (a round key never comes back after its round,
so the most recent ones are all that can matter)."""

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StateError(Exception):
    """The state directory cannot be used (unreadable, corrupt, owned by another population)."""


class StateLocked(StateError):
    """Another process holds this state directory."""


def atomic_write_json(path: Path, value: Any, mode: int = 0o600) -> None:
    """Replace ``path`` with ``value`` as JSON: all of it or nothing, even across a crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; this is not
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise StateError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise StateError(f"{path} must hold a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class Identity:
    """What enrollment gave this device (``identity.json``)."""

    server: str
    population: str
    device_id: str
    credential: str
    issued_at: float
    expires_at: float
    renew_after: float

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "identity") -> Identity:
        """Check every field (the file, or a server's answer, may be anything)."""
        try:
            server, population = str(raw["server"]), str(raw["population"])
            device_id, credential = raw["device_id"], raw["credential"]
            times = [float(raw[k]) for k in ("issued_at", "expires_at", "renew_after")]
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{where}: missing or malformed field {exc}") from None
        if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
            raise StateError(f"{where}: bad device_id {device_id!r}")
        if not isinstance(credential, str) or not 0 < len(credential) <= 512:
            raise StateError(f"{where}: credential must be a string of 1..512 characters")
        if not all(math.isfinite(t) for t in times):
            raise StateError(f"{where}: times must be finite numbers")
        return cls(server, population, device_id, credential, *times)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public(self) -> dict[str, Any]:
        """Everything but the credential (what ``fedfleet device status`` may print)."""
        out = self.as_dict()
        del out["credential"]
        return out


class StateDir:
    """The files of one device's state directory (created 0700 if missing).

    Call :meth:`lock` before changing anything; the lock is held until :meth:`unlock` or the
    process ends (the kernel releases ``flock`` locks of dead processes, so a killed device
    never leaves a stale lock behind).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise StateError(f"cannot use state directory {self.path}: {exc}") from None
        self._lock_fd: int | None = None

    @property
    def examples_path(self) -> Path:
        return self.path / "examples.sqlite"

    @property
    def identity_path(self) -> Path:
        return self.path / "identity.json"

    # -- lock -------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the directory for this process, or raise :class:`StateLocked`."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(
                f"state directory {self.path} is in use by another fedfleet device process "
                "(one process per state directory; give each device its own --state)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- identity ---------------------------------------------------------------------------------
    def load_identity(self) -> Identity | None:
        raw = _read_json(self.identity_path)
        return None if raw is None else Identity.from_dict(raw, str(self.identity_path))

    def save_identity(self, identity: Identity) -> None:
        atomic_write_json(self.identity_path, identity.as_dict(), 0o600)

    def clear_identity(self) -> None:
        self.identity_path.unlink(missing_ok=True)

    # -- schedule ---------------------------------------------------------------------------------
    def _schedule(self) -> dict[str, Any]:
        return _read_json(self.path / "schedule.json") or {}

    def load_next_checkin(self) -> float:
        """The persisted next check-in time (0 when none was given yet)."""
        try:
            value = float(self._schedule().get("next_checkin", 0.0))
        except (TypeError, ValueError):
            return 0.0
        return value if math.isfinite(value) else 0.0

    def load_reported(self) -> list[str]:
        reported = self._schedule().get("reported", [])
        return [str(k) for k in reported] if isinstance(reported, list) else []

    def save_schedule(self, next_checkin: float, reported: list[str]) -> None:
        atomic_write_json(
            self.path / "schedule.json",
            {"next_checkin": float(next_checkin), "reported": reported[-REPORTED_KEPT:]},
            0o600,
        )

    # -- data files -------------------------------------------------------------------------------
    def loaded_data(self) -> dict[str, Any]:
        """sha256 of each data file loaded into the Example Store -> what was recorded then."""
        files = (_read_json(self.path / "data.json") or {}).get("files", {})
        return dict(files) if isinstance(files, dict) else {}

    def record_data(self, sha256: str, info: Mapping[str, Any]) -> None:
        files = self.loaded_data()
        files[sha256] = dict(info)
        atomic_write_json(self.path / "data.json", {"files": files}, 0o600)
