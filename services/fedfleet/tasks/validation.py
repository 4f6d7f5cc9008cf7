"""Before a job starts: does its data fit its task? (``fedfleet validate``, job start.)

The fleet's training examples and the held-out set are decoded by the task and checked by it;
a mismatch is a :class:`~fedfleet.tasks.TaskError` that names the manifest field the data came
from, the task's complaint and the data's shapes per example.
"""

from __future__ import annotations

from fedfleet.core.spec import FLJob
from fedfleet.tasks.api import Examples
from fedfleet.tasks.loader import check_data, task_of

__all__ = ["check_job_data"]


def check_job_data(job: FLJob, train: Examples, test: Examples | None) -> None:
    """Raise ``TaskError`` unless the job's task can use ``train`` and ``test``."""
    loaded = task_of(job)
    where = "spec.fleet.data" if job.spec.fleet.data is not None else "spec.fleet.dataset"
    check_data(loaded, train, where)
    if test is not None:
        named = job.spec.evaluation.data is not None
        check_data(loaded, test, "spec.evaluation.data" if named else where)
