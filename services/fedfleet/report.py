"""Turn a finished job's :class:`~fedfleet.results.JobResult` into files and a summary.

The JSON report, the accuracy/loss plot and the rows of the CLI's summary table are built here
from the result alone, so the CLI, the benchmark and tests share one rendering and none of
them needs the actors. matplotlib is imported inside :func:`write_plot` (it is slow to import
and only that function needs it) with the non-interactive Agg backend, so plotting works on a
headless CI runner or in a pod.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedfleet.results import JobResult, RoundRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["summary_rows", "write_plot", "write_report"]

_MISSING = "n/a"


def write_report(result: JobResult, path: Path) -> None:
    """Write the JSON report (per-round rows and totals) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_report(), indent=2) + "\n", encoding="utf-8")


def write_plot(result: JobResult, path: Path) -> None:
    """Write a PNG of accuracy and loss per committed round, abandoned attempts marked.

    Two stacked subplots share the round axis (rather than twin y-axes, whose scales are easy
    to misread). Each abandoned attempt is a dashed red line at the round it failed to commit.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    committed = [r for r in result.rounds if not r.abandoned]
    abandoned = [r for r in result.rounds if r.abandoned]

    # A Figure built directly (not through pyplot) holds no global state, so repeated calls
    # neither leak figures nor interfere with a caller's own pyplot session.
    fig = Figure(figsize=(8.0, 6.0), layout="constrained")
    ax_acc, ax_loss = fig.subplots(2, 1, sharex=True)
    _plot_metric(ax_acc, committed, lambda r: r.accuracy, "tab:blue", "accuracy")
    _plot_metric(ax_loss, committed, lambda r: r.loss, "tab:orange", "loss")
    for ax in (ax_acc, ax_loss):
        for i, record in enumerate(abandoned):
            ax.axvline(
                record.round,
                color="tab:red",
                linestyle="--",
                linewidth=0.8,
                alpha=0.7,
                label="abandoned attempt" if i == 0 else None,
            )
        ax.grid(True, alpha=0.3)
        if committed or abandoned:
            ax.legend(loc="best", fontsize="small")
    ax_loss.set_xlabel("round")
    outcome = "succeeded" if result.succeeded else "did not succeed"
    fig.suptitle(
        f"FLJob {result.job}: {len(committed)} rounds, {len(abandoned)} abandoned ({outcome})"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def _plot_metric(
    ax: Axes,
    records: list[RoundRecord],
    metric: Callable[[RoundRecord], float | None],
    color: str,
    label: str,
) -> None:
    points = [(r.round, value) for r in records if (value := metric(r)) is not None]
    ax.plot(
        [x for x, _ in points],
        [y for _, y in points],
        marker="o",
        markersize=3,
        color=color,
        label=label,
    )
    ax.set_ylabel(label)


def summary_rows(result: JobResult) -> list[tuple[str, str]]:
    """(label, value) rows of the end-of-job summary table, values already formatted."""
    report = result.to_report()["totals"]
    privacy: list[tuple[str, str]] = []
    best: list[tuple[str, str]] = []
    if result.best_model is not None:
        b = result.best_model
        metric = ", ".join(
            f"{k} {_number(v)}" for k, v in b.items() if k not in ("version", "round")
        )
        best = [("Best model", f"version {b['version']} (round {b['round']}, {metric})")]
    if result.epsilon is not None:
        privacy = [("Privacy (epsilon, delta)", f"({result.epsilon:.3f}, {result.delta or 0:g})")]
    return [
        *privacy,
        ("Rounds committed", str(report["rounds"])),
        ("Attempts", str(report["attempts"])),
        ("Abandoned", str(report["abandoned"])),
        ("Final accuracy", _percent(result.final_accuracy)),
        ("Final loss", _number(result.final_loss)),
        ("Model version", str(result.model_version)),
        *best,
        ("Wall seconds", f"{result.wall_seconds:.1f}"),
        ("Simulated seconds", f"{result.sim_seconds:.0f}"),
        ("Outcome", _outcome(result)),
    ]


def _percent(value: float | None) -> str:
    return _MISSING if value is None else f"{value:.2%}"


def _number(value: float | None) -> str:
    return _MISSING if value is None else f"{value:.4f}"


def _outcome(result: JobResult) -> str:
    if result.succeeded:
        why = {
            "rounds": "all rounds done",
            "target": "target accuracy reached",
            "epsilon-budget": "privacy budget spent",
        }
        return f"succeeded ({why.get(result.reason, result.reason or 'done')})"
    error = f": {result.error}" if result.error else ""
    return f"failed ({result.reason or 'no reason given'}{error})"
