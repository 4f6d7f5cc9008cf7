"""fedfleet's Kubernetes operator: turns FLJob objects into the actors that run them.

The package is named ``fedfleet_operator`` (never ``operator``, which would shadow the standard
library). It is layered like kopf itself: pure modules first (:mod:`.settings`, :mod:`.naming`,
:mod:`.conditions`, :mod:`.builders`, :mod:`.status`, :mod:`.validation`), then the adapters
that do I/O (:mod:`.kube`, :mod:`.events`, :mod:`.reconcile`), then thin kopf handlers, one
module per concern (:mod:`.handlers`), and :mod:`.main` which starts kopf. Importing the package
imports neither kopf nor the Kubernetes client.

It talks to the actors only through the contract in ``operator/CONTRACT.md`` (child objects,
their env, the store's ``job_state``/``metrics``) and imports nothing from the actors'
modules: only ``fedfleet.core.spec``, ``fedfleet.core.roles`` and ``fedfleet.store``.
"""

from __future__ import annotations

__all__: list[str] = []
