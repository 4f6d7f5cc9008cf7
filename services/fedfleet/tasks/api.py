"""The task API: the one thing a user writes to train their own model with fedfleet.

Bonawitz et al.'s FL plan carries an arbitrary computation; fedfleet's is a Python object that
implements :class:`FLTask`. The server never runs a framework: it only sees the task's weights
as float32 arrays, named and in a fixed order (:meth:`FLTask.initial_weights`), sums device
updates (new minus old weights) and applies its optimizer to them. Devices call the task to
train and evaluate; the master aggregator calls :meth:`FLTask.evaluate` on held-out data.

Examples travel as :data:`Examples`: named arrays that share their first dimension (one row per
example), the same records the device's Example Store holds. A manifest names a task as
``spec.task: {ref: "package.module:attribute", config: {...}}``; the attribute is called with
``config`` and returns the task (so a task class whose ``__init__`` takes the config works), and
it refuses a config it cannot use by raising ``ValueError``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.models import TrainingAborted, Weights
from fedfleet.core.spec import PlanSpec

__all__ = [
    "DataMismatch",
    "Examples",
    "FLTask",
    "PlanSpec",
    "TrainResult",
    "TrainingAborted",
    "Weights",
]

Examples: TypeAlias = Mapping[str, NDArray[Any]]
"""Named fields of equal length (the first dimension counts examples): features of any shape and
dtype, and labels. The simulator's files give ``x`` (features) and ``y`` (labels) for tables, and
every array under its own name for ``.npz`` files."""


class DataMismatch(ValueError):
    """Examples a task cannot use; ``field`` names the offending field, the message its shapes."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What local training returns: the device's report."""

    update: Weights
    """New minus old weights, float32, in the order and shapes of the initial weights."""
    num_examples: int
    """Examples trained on: the update's weight in FedAvg (at least 1)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Training metrics (for example loss and accuracy); averaged per round by examples and
    recorded as ``train_<name>``."""


class FLTask(ABC):
    """A federated learning task: the model, local training, evaluation and data decoding.

    Weights are always passed as float32 arrays in the order of :meth:`initial_weights`; the
    task must not modify them in place. Everything random takes the ``rng`` it is given so a
    simulation is reproducible. One task object serves every device of a process, and a
    simulated fleet over HTTP trains in a thread pool: :meth:`train` and :meth:`evaluate` may
    run in several threads at once, so keep per-call state local (or per thread).
    """

    parallel_training: ClassVar[bool] = False
    """Whether :meth:`train` spends most of its time outside Python's GIL (a framework's
    kernels), so that the embedded simulator trains several devices at once in threads, one
    per CPU (``EmbeddedOptions.train_workers``). The PyTorch adapter sets it; plain numpy
    tasks of small models do not gain from threads."""

    @abstractmethod
    def initial_weights(self) -> dict[str, NDArray[np.float32]]:
        """The model at version 0: float32 arrays by name, in the order that is used for every
        update and checkpoint. It must be deterministic (every actor calls it)."""

    @abstractmethod
    def train(
        self,
        weights: Weights,
        examples: Examples,
        plan: PlanSpec,
        rng: np.random.Generator,
        should_continue: Callable[[int], bool],
    ) -> TrainResult:
        """Train locally from the global ``weights`` on the device's ``examples`` (already
        :meth:`decode`-d) with ``plan`` (epochs, batch size, learning rate, proximal term).

        Ask ``should_continue(epoch)`` before every epoch and raise
        :class:`TrainingAborted` when it answers False (the device lost eligibility)."""

    @abstractmethod
    def evaluate(self, weights: Weights, examples: Examples) -> dict[str, float]:
        """Metrics of ``weights`` on ``examples`` (``loss`` and ``accuracy`` are the ones the
        progress display and ``rounds.targetAccuracy`` use)."""

    def decode(self, records: Examples) -> Examples:
        """Turn Example Store records into what :meth:`train` and :meth:`evaluate` take
        (reshape, scale, cast). The default passes them through."""
        return records

    def check_data(self, examples: Examples) -> None:
        """Raise :class:`DataMismatch` if the (decoded) examples cannot be used: wrong shapes,
        labels out of range. Called before a job starts, on the fleet's and held-out data."""
        return None


def metrics_of(values: Mapping[str, Any]) -> dict[str, float]:
    """Finite float metrics of a task's answer (anything else is dropped)."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if isinstance(v, int | float | np.integer | np.floating) and np.isfinite(v):
            out[str(k)] = float(v)
    return out
