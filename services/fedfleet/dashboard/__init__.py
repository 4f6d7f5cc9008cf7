"""Watching jobs from the store: ``fedfleet dashboard`` (a live web page) and ``fedfleet report``.

Both read only what the actors already keep in the store — the job record the coordinator
publishes, the attempt history, the committed rounds' metrics — so they work for a job run by
``fedfleet up`` or on a cluster, while it runs or long after, without talking to any actor.
"""

from fedfleet.dashboard.views import JobReader, attempt_row, job_summary, numeric_metrics

__all__ = ["JobReader", "attempt_row", "job_summary", "numeric_metrics"]
