"""kopf handlers, one module per concern, registered explicitly.

Each module defines plain functions and a ``register(registry, settings)`` that applies kopf's
decorators to them. Registration is explicit rather than at import time so that importing a
handler (in a unit test) registers nothing, and so that values from the settings (the status
interval) reach the decorators without reading the environment at import.

==============  ========================================================================
``startup``     kopf settings (finalizer, annotation storages, peering, events), a probe
``create``      validate; create the children; Pending (or Invalid, without children)
``update``      spec changes and operator restarts: converge the children; Invalid
``status``      timer: progress from the store into ``.status``; completion
``delete``      finalizer: remove the job's keys from the store
``population``  FLPopulation: its enrollment Secret and devices' Service; timer: its jobs
==============  ========================================================================
"""

from __future__ import annotations

import kopf

from fedfleet_operator.handlers import create, delete, population, startup, status, update
from fedfleet_operator.settings import OperatorSettings

__all__ = ["register_all"]


def register_all(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Register every handler of the operator in ``registry``."""
    for module in (startup, create, update, status, delete, population):
        module.register(registry, settings)
