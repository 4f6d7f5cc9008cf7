"""Loading the task an FLJob names (``spec.task.ref``) and checking it against data.

Every actor that needs the task — devices to train, the master to evaluate, selectors and
aggregators for the model's array shapes — loads it here, once per process: the import and the
task's initial weights are cached by (ref, config, path). A task that cannot be imported,
refuses its config or returns unusable initial weights is a :class:`TaskError` whose message
names the manifest field, so ``fedfleet validate`` and job start report it in one line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedfleet.core.models import Weights, shapes_of
from fedfleet.core.spec import FLJob, TaskSpec
from fedfleet.tasks.api import DataMismatch, Examples, FLTask

__all__ = ["LoadedTask", "TaskError", "check_data", "load_task", "task_of"]


class TaskError(ValueError):
    """A task or data the job cannot run with; the message starts with the manifest field."""


@dataclass(frozen=True, eq=False)
class LoadedTask:
    """A task and what the server needs of it: its weights' names, shapes and version 0."""

    spec: TaskSpec
    task: FLTask
    names: tuple[str, ...]
    """The weights' names, in the task's fixed order."""
    initial: Weights
    """The model at version 0 (read-only arrays)."""

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return shapes_of(self.initial)

    @property
    def num_parameters(self) -> int:
        return sum(int(w.size) for w in self.initial)


_cache: dict[str, LoadedTask] = {}
_lock = threading.Lock()


def _key(spec: TaskSpec) -> str:
    return json.dumps([spec.ref, spec.config, spec.path], sort_keys=True, default=str)


def task_of(job: FLJob) -> LoadedTask:
    """The job's task (``spec.task``, or the built-in one ``spec.model`` stands for)."""
    return load_task(job.spec.effective_task)


def load_task(spec: TaskSpec) -> LoadedTask:
    """Import, configure and check the task ``spec`` names (cached per process)."""
    key = _key(spec)
    with _lock:
        loaded = _cache.get(key)
        if loaded is None:
            loaded = _cache[key] = _load(spec)
        return loaded


def _load(spec: TaskSpec) -> LoadedTask:
    module_name, _, attr = spec.ref.partition(":")
    # A Keras task's module imports keras before fedfleet.tasks.keras can pick the backend:
    # default to JAX (what the `keras` extra installs) unless the user chose one.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if spec.path is not None and spec.path not in sys.path:
        sys.path.insert(0, spec.path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = f" (spec.task.path {spec.path})" if spec.path else ""
        raise TaskError(
            f"spec.task.ref: cannot import module {module_name!r}{where}: {exc}"
        ) from None
    except Exception as exc:
        raise TaskError(
            f"spec.task.ref: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise TaskError(f"spec.task.ref: module {module_name!r} has no attribute {attr!r}")
    if isinstance(factory, FLTask):
        if spec.config:
            raise TaskError(f"spec.task.config: {spec.ref} is a task object and takes no config")
        task: Any = factory
    elif callable(factory):
        try:
            task = factory(dict(spec.config))
        except (ValueError, TypeError, KeyError) as exc:
            raise TaskError(f"spec.task.config: {spec.ref} refused it: {exc}") from None
    else:
        raise TaskError(f"spec.task.ref: {spec.ref} is neither a task nor a task factory")
    if not isinstance(task, FLTask):
        raise TaskError(
            f"spec.task.ref: {spec.ref} returned {type(task).__name__}, not a fedfleet.tasks.FLTask"
        )
    names, initial = _check_initial(spec, task.initial_weights())
    return LoadedTask(spec=spec, task=task, names=names, initial=initial)


def _check_initial(spec: TaskSpec, weights: Any) -> tuple[tuple[str, ...], Weights]:
    where = f"spec.task.ref: {spec.ref} initial_weights()"
    if not isinstance(weights, Mapping) or not weights:
        raise TaskError(f"{where} must return a non-empty mapping of name to array")
    names: list[str] = []
    arrays: Weights = []
    for name, value in weights.items():
        if not isinstance(name, str) or not name:
            raise TaskError(f"{where}: array names must be non-empty strings, got {name!r}")
        arr: NDArray[Any] = np.asarray(value)
        if arr.dtype != np.float32:
            raise TaskError(f"{where}: {name!r} is {arr.dtype}, weights must be float32")
        if not np.isfinite(arr).all():
            raise TaskError(f"{where}: {name!r} holds NaN or infinity")
        arr = np.array(arr, dtype=np.float32, copy=True)
        arr.flags.writeable = False
        names.append(name)
        arrays.append(arr)
    return tuple(names), arrays


def check_data(loaded: LoadedTask, records: Examples, where: str) -> Examples:
    """Decode ``records`` with the task and let it check them; :class:`TaskError` names
    ``where`` (the manifest field the data came from), the field and the shapes."""
    if not records:
        raise TaskError(f"{where}: no fields")
    lengths = {name: len(np.asarray(a)) for name, a in records.items()}
    if len(set(lengths.values())) > 1:
        raise TaskError(f"{where}: fields differ in length: {lengths}")
    try:
        decoded = loaded.task.decode(records)
        loaded.task.check_data(decoded)
    except DataMismatch as exc:
        schema = ", ".join(
            f"{k} {np.asarray(v).shape[1:]} {np.asarray(v).dtype}" for k, v in records.items()
        )
        raise TaskError(
            f"{where}: field {exc.field!r} does not fit the task ({loaded.spec.ref}): {exc} "
            f"[data per example: {schema}]"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise TaskError(f"{where}: the task ({loaded.spec.ref}) cannot decode it: {exc}") from None
    return decoded
