"""Eligibility conditions of a real Linux device, read from what the OS exposes.

Bonawitz et al. train only on devices that are charging, on an unmetered network and idle, so
federated learning never costs the user battery, data or responsiveness. On a phone the OS
answers those questions; on a Linux device this module does:

* **charging** and **battery** from ``/sys/class/power_supply``: a device with no battery at all
  runs on mains power and counts as charging; otherwise it is charging when a mains/USB supply is
  ``online`` or a battery's ``status`` is ``Charging``, ``Full`` or ``Not charging`` (plugged in,
  held by a charge threshold). Peripheral batteries (``scope`` = ``Device``: a mouse) are ignored.
* **idle** from the 1-minute load average in ``/proc/loadavg`` against the CPU count: idle while
  ``load1 < max_load * cpus``. During a task the device's own training adds about one CPU of
  load, so the check made before each epoch allows that one extra CPU (otherwise every device
  would abort its own task by working on it).
* **unmetered** from configuration (``--metered``): Linux has no reliable metered flag.
* **the app's own signals**: a callable, or a JSON file (``--conditions FILE``, re-read every
  time) holding any of ``charging``, ``idle``, ``unmetered`` as booleans; each key present
  overrides what the OS says.

Roots are parameters so tests lay out a temporary directory like sysfs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedfleet.device.runtime import DeviceConditions

__all__ = [
    "OVERRIDABLE",
    "ConditionsError",
    "ConditionsSource",
    "PowerState",
    "SystemSignals",
    "is_idle",
    "read_conditions_file",
    "read_load",
    "read_power",
]

POWER_SUPPLY = Path("/sys/class/power_supply")
LOADAVG = Path("/proc/loadavg")
OVERRIDABLE = ("charging", "idle", "unmetered")
"""The conditions an app (or ``--conditions FILE``) may set."""

_PLUGGED_STATUS = {"charging", "full", "not charging"}


class ConditionsSource(Protocol):
    """Where a device reads its eligibility conditions from (:class:`SystemSignals`, or an
    app's callable). ``busy`` is True while the device is training (its own load must not count
    against it); an app's callable may ignore it."""

    def __call__(self, busy: bool = False) -> DeviceConditions: ...


class ConditionsError(ValueError):
    """An app-supplied conditions source is unusable (unreadable file, not booleans)."""


@dataclass(frozen=True, slots=True)
class PowerState:
    charging: bool
    """On external power (or no battery at all)."""
    battery: float | None
    """Mean charge of the system batteries in percent, None when there is none."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_power(root: Path = POWER_SUPPLY) -> PowerState:
    """Charging and battery level from a sysfs ``power_supply`` tree at ``root``."""
    try:
        supplies = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        supplies = []  # no power_supply class (a VM, a container): mains powered
    online = False
    batteries: list[Path] = []
    for supply in supplies:
        kind = (_read(supply / "type") or "").lower()
        if kind == "battery":
            if (_read(supply / "scope") or "").lower() != "device":
                batteries.append(supply)
        elif _read(supply / "online") == "1":
            online = True  # Mains, USB, USB_PD, Wireless...
    if not batteries:
        return PowerState(charging=True, battery=None)
    levels: list[float] = []
    plugged = online
    for bat in batteries:
        if (_read(bat / "status") or "").lower() in _PLUGGED_STATUS:
            plugged = True
        raw = _read(bat / "capacity")
        try:
            level = float(raw) if raw is not None else math.nan
        except ValueError:
            level = math.nan
        if math.isfinite(level):
            levels.append(min(100.0, max(0.0, level)))
    return PowerState(plugged, sum(levels) / len(levels) if levels else None)


def read_load(path: Path = LOADAVG) -> float | None:
    """The 1-minute load average, None when it cannot be read."""
    text = _read(path)
    if not text:
        return None
    try:
        value = float(text.split()[0])
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def is_idle(load: float | None, cpus: int, max_load: float, *, extra_cpus: float = 0.0) -> bool:
    """Idle while the load is under ``max_load`` per CPU (plus ``extra_cpus`` of allowance).

    An unreadable load counts as idle: the device has no way to tell, and the server still
    applies the job's own requirements."""
    if load is None:
        return True
    return load < max_load * max(1, cpus) + extra_cpus


def _overrides(raw: object, where: str) -> dict[str, bool]:
    if not isinstance(raw, Mapping):
        raise ConditionsError(f"{where}: must be a JSON object")
    out: dict[str, bool] = {}
    for key, value in raw.items():
        if key not in OVERRIDABLE:
            raise ConditionsError(f"{where}: unknown key {key!r} (allowed: {OVERRIDABLE})")
        if not isinstance(value, bool):
            raise ConditionsError(f"{where}: {key} must be true or false, got {value!r}")
        out[key] = value
    return out


def read_conditions_file(path: Path) -> dict[str, bool]:
    """The overrides an app wrote to ``path`` (``{"charging": true, ...}``)."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConditionsError(f"conditions file {path}: {exc}") from None
    except ValueError as exc:
        raise ConditionsError(f"conditions file {path}: not JSON: {exc}") from None
    return _overrides(raw, f"conditions file {path}")


class SystemSignals:
    """A conditions source for :class:`~fedfleet.device.agent.DeviceAgent`: call it to read
    the current conditions (``busy=True`` while this device itself is training)."""

    def __init__(
        self,
        *,
        metered: bool = False,
        max_load: float = 0.5,
        overrides: Path | Callable[[], Mapping[str, bool]] | None = None,
        power_root: Path = POWER_SUPPLY,
        loadavg: Path = LOADAVG,
        cpus: int | None = None,
    ) -> None:
        if not (math.isfinite(max_load) and max_load > 0):
            raise ValueError(f"max_load must be a positive number, got {max_load}")
        self.metered = metered
        self.max_load = max_load
        self.overrides = overrides
        self.power_root = power_root
        self.loadavg = loadavg
        self.cpus = cpus or os.cpu_count() or 1
        self.battery: float | None = None
        """The battery level at the last reading (percent; None without a battery)."""

    def _app(self) -> dict[str, bool]:
        if self.overrides is None:
            return {}
        if isinstance(self.overrides, Path):
            return read_conditions_file(self.overrides)
        return _overrides(self.overrides(), "app conditions")

    def __call__(self, busy: bool = False) -> DeviceConditions:
        """The conditions now; raises :class:`ConditionsError` if the app's source is bad."""
        app = self._app()
        power = read_power(self.power_root)
        self.battery = power.battery
        idle = is_idle(
            read_load(self.loadavg), self.cpus, self.max_load, extra_cpus=1.0 if busy else 0.0
        )
        return DeviceConditions(
            charging=app.get("charging", power.charging),
            unmetered=app.get("unmetered", not self.metered),
            idle=app.get("idle", idle),
        )
