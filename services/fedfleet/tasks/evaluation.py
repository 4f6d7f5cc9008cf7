"""Server-side evaluation: the master aggregator scores every committed model with the task.

The task's :meth:`~fedfleet.tasks.FLTask.evaluate` runs on held-out examples the manifest names
(decoded once, up front); only finite numbers are recorded in the round's metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from fedfleet.core.models import Weights
from fedfleet.tasks.api import Examples, metrics_of
from fedfleet.tasks.loader import LoadedTask

__all__ = ["task_evaluator"]


def task_evaluator(loaded: LoadedTask, examples: Examples) -> Callable[[Weights], dict[str, float]]:
    """A function scoring weights on ``examples`` (raw records: decoded here, once)."""
    decoded = loaded.task.decode(examples)
    task = loaded.task

    def run(weights: Weights) -> dict[str, float]:
        return metrics_of(task.evaluate(weights, decoded))

    return run
