"""``fedfleet report``: the JSON report and PNG plot of a job from the store, after the fact.

``fedfleet run`` and ``fedfleet up`` build a :class:`~fedfleet.results.JobResult` while they
watch a job; a job on a cluster had no one watching, but the store keeps everything the report
needs: the attempt history (the same records ``fedfleet up`` follows, turned into rows by
:func:`fedfleet.up.record_from_attempt`), the committed rounds' metrics and the job record
(phase, reason, start and completion times). :func:`result_from_store` rebuilds the result from
them, and :mod:`fedfleet.report` writes the same two files. A job still running gets a report
as of now.

An attempt's ``seconds`` here is its duration in the store's clock (opened to ended), since no
one measured wall time between attempts; ``sim_seconds`` is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from fedfleet.core.roles import JobPhase
from fedfleet.results import JobResult
from fedfleet.store_args import add_store_argument, store_from_args

__all__ = ["JobHistory", "add_arguments", "result_from_store", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_FINISHED = "job-finished"  # a pipelined selection cut short by the job's end: not a round


class JobHistory(Protocol):
    """The store reads a report needs."""

    def job_state(self, job: str) -> dict[str, Any]: ...

    def attempts(self, job: str, start: int = 0) -> list[dict[str, Any]]: ...

    def metrics(self, job: str) -> list[dict[str, Any]]: ...

    def model_version(self, job: str) -> int: ...


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def result_from_store(store: JobHistory, key: str, *, now: float | None = None) -> JobResult | None:
    """The job's result as its store records it; None when the store has nothing of it."""
    from fedfleet.up import record_from_attempt

    state = store.job_state(key)
    attempts = store.attempts(key)
    if not state and not attempts:
        return None
    result = JobResult(job=key)
    for a in attempts:
        if a.get("reason") == _FINISHED:
            continue
        seconds = float(a["ended_at"]) - float(a["opened_at"])
        record = record_from_attempt(a, seconds)
        eps = (a.get("metrics") or {}).get("epsilon")
        result.rounds.append(dataclasses.replace(record, epsilon=_float(eps)))
    result.model_version = store.model_version(key)
    history = store.metrics(key)
    if history:
        last = history[-1]
        result.final_accuracy = _float(last.get("accuracy"))
        result.final_loss = _float(last.get("loss"))
        result.epsilon = _float(last.get("epsilon"))
        result.delta = _float(last.get("delta"))
    phase = state.get("phase")
    result.succeeded = phase == JobPhase.succeeded.value
    result.reason = str(state.get("reason", ""))
    start, end = state.get("start_time"), state.get("completion_time")
    if start is not None:
        finished_at = float(end) if end is not None else (time.time() if now is None else now)
        result.wall_seconds = max(0.0, finished_at - float(start))
    result.sim_seconds = result.wall_seconds
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    parser.add_argument(
        "--job",
        required=True,
        metavar="NS/NAME",
        help="the job key: <namespace>/<name> of the FLJob (see its .status.model.key)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="folder for <name>.json and <name>.png (default: ./runs/<name>)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the report and plot; 1 when the job is unknown or the store is down, 2 on usage."""
    from fedfleet.cli import _safe_stem
    from fedfleet.report import write_plot, write_report
    from fedfleet.store.base import StoreUnavailable

    store = store_from_args(args)
    if store is None:
        return EXIT_USAGE
    try:
        result = result_from_store(store, args.job)
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:  # a key the store refuses
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        store.close()
    if result is None:
        print(
            f"error: no job {args.job!r} in the store (a wrong key, or the FLJob was deleted)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    stem = _safe_stem(args.job.rpartition("/")[2])
    out_dir: Path = args.out if args.out is not None else Path("runs") / stem
    files = [("report", out_dir / f"{stem}.json"), ("plot", out_dir / f"{stem}.png")]
    try:
        write_report(result, files[0][1])
        write_plot(result, files[1][1])
    except OSError as exc:
        print(f"error: cannot write into {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    committed = sum(not r.abandoned for r in result.rounds)
    outcome = "succeeded" if result.succeeded else (result.reason or "not finished")
    print(
        f"job {args.job}: {committed} rounds committed in {len(result.rounds)} attempts, "
        f"model version {result.model_version} ({outcome})",
        file=sys.stderr,
    )
    for kind, path in files:
        print(f"wrote {kind:<6} {path}")
    return EXIT_OK
