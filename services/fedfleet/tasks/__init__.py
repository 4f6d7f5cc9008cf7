"""Tasks: the user's model, local training, evaluation and data decoding (the FL plan's
computation). :mod:`fedfleet.tasks.api` is the interface, :mod:`fedfleet.tasks.builtin` the numpy
softmax/MLP that ``spec.model`` stands for, :mod:`fedfleet.tasks.loader` how a manifest's
``spec.task.ref`` becomes a task. Nothing outside this package knows a model's kind."""

from fedfleet.tasks.api import DataMismatch, Examples, FLTask, TrainResult
from fedfleet.tasks.loader import LoadedTask, TaskError, check_data, load_task, task_of

__all__ = [
    "DataMismatch",
    "Examples",
    "FLTask",
    "LoadedTask",
    "TaskError",
    "TrainResult",
    "check_data",
    "load_task",
    "task_of",
]
