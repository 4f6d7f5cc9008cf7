"""Device side: Example Store, FL runtime, the real-device agent and the fleet simulator.

The public API for an app on a real device (imported lazily, so importing a submodule such as
the Example Store does not load the HTTP client):

* :class:`DeviceAgent` — enrolls, checks in when eligible, runs allowed tasks, reports once;
* :class:`ExampleStore` — the SQLite store the app feeds with examples;
* :class:`SystemSignals` — eligibility from ``/sys/class/power_supply``, load and configuration;
* :class:`DeviceConditions` — what an app-supplied conditions callable
  (:class:`ConditionsSource`) returns;
* :class:`StateDir` / :class:`Identity` — the persisted state directory and enrollment identity;
* :class:`CredentialRefused`, :class:`EnrollmentRefused`, :data:`BUILTIN_TASKS`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedfleet.device.agent import (
        BUILTIN_TASKS,
        CredentialRefused,
        DeviceAgent,
        EnrollmentRefused,
    )
    from fedfleet.device.example_store import ExampleStore
    from fedfleet.device.runtime import DeviceConditions
    from fedfleet.device.signals import ConditionsSource, SystemSignals
    from fedfleet.device.state import Identity, StateDir

__all__ = [
    "BUILTIN_TASKS",
    "ConditionsSource",
    "CredentialRefused",
    "DeviceAgent",
    "DeviceConditions",
    "EnrollmentRefused",
    "ExampleStore",
    "Identity",
    "StateDir",
    "SystemSignals",
]

_WHERE = {
    "BUILTIN_TASKS": "agent",
    "CredentialRefused": "agent",
    "DeviceAgent": "agent",
    "EnrollmentRefused": "agent",
    "ExampleStore": "example_store",
    "DeviceConditions": "runtime",
    "SystemSignals": "signals",
    "ConditionsSource": "signals",
    "Identity": "state",
    "StateDir": "state",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fedfleet.device' has no attribute {name!r}")
    return getattr(import_module(f"fedfleet.device.{module}"), name)
