"""Show a running job round by round: a live table on a terminal, plain lines elsewhere.

The runner only knows the :class:`~fedfleet.results.ProgressSink` protocol; which display is
used is decided here (:func:`make_progress`) from whether stdout is a terminal, so a CI log
gets one greppable line per round instead of cursor-movement codes. Every display is also a
context manager: the live one owns a terminal refresh thread that must be stopped.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Protocol, Self

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfleet.results import ProgressSink, RoundRecord

__all__ = ["LineProgress", "LiveProgress", "ProgressDisplay", "QuietProgress", "make_progress"]


class ProgressDisplay(ProgressSink, Protocol):
    """A progress sink that is also a context manager (entered for the length of the job)."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class _Display(ProgressSink):
    """Context-manager plumbing shared by the displays (entering and leaving do nothing)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class QuietProgress(_Display):
    """Shows nothing (``--quiet``, library use, tests)."""

    def round_started(self, round_: int, selected: int) -> None:
        pass

    def round_ended(self, record: RoundRecord) -> None:
        pass


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class LineProgress(_Display):
    """One plain line per round attempt, for logs and pipes (no colour, no cursor codes)."""

    def __init__(self, total_rounds: int, console: Console) -> None:
        self.total_rounds = total_rounds
        self.console = console

    def round_started(self, round_: int, selected: int) -> None:
        pass  # a line per attempt is enough; a start line would double the log

    def round_ended(self, record: RoundRecord) -> None:
        head = (
            f"round {record.round}/{self.total_rounds}  selected {record.selected}  "
            f"reports {record.reported}  dropped {record.dropped}"
        )
        if record.abandoned:
            tail = f"ABANDONED ({record.reason or 'no reason given'})"
        else:
            tail = f"loss {_fmt(record.loss, '.4f')}  accuracy {_fmt(record.accuracy, '.2%')}"
        self.console.print(
            f"{head}  {tail}  {record.seconds:.2f}s",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


class LiveProgress(_Display):
    """A live table of the latest round attempts above a bar of committed rounds / total.

    The table keeps the last ``max_rows`` attempts so it fits on a screen; the full history is
    in the JSON report. Events may arrive from the runner's thread while rich redraws from its
    own, so the rows are guarded by a lock.
    """

    def __init__(self, total_rounds: int, console: Console, *, max_rows: int = 15) -> None:
        self.total_rounds = total_rounds
        self.console = console
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._records: list[RoundRecord] = []
        self._running: tuple[int, int] | None = None
        self._progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[dim]{task.fields[abandoned]} abandoned"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._progress.add_task("rounds", total=total_rounds, abandoned=0, start=False)
        self._live = Live(
            console=console, get_renderable=self._render, refresh_per_second=4, transient=False
        )

    def __enter__(self) -> Self:
        self._progress.start_task(self._task)  # the elapsed clock starts with the job
        self._live.start(refresh=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.stop()

    def round_started(self, round_: int, selected: int) -> None:
        with self._lock:
            self._running = (round_, selected)
        self._live.refresh()

    def round_ended(self, record: RoundRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._running = None
            abandoned = sum(r.abandoned for r in self._records)
        self._progress.update(self._task, advance=0 if record.abandoned else 1, abandoned=abandoned)
        self._live.refresh()

    def _render(self) -> RenderableType:
        with self._lock:
            records = self._records[-self.max_rows :]
            hidden = len(self._records) - len(records)
            running = self._running
        table = Table(
            "Round",
            "Selected",
            "Reports",
            "Dropped",
            "Loss",
            "Accuracy",
            "Seconds",
            "Status",
            caption=f"{hidden} earlier attempts in the report" if hidden else None,
        )
        for col in table.columns[:7]:
            col.justify = "right"
        for r in records:
            if r.abandoned:
                status, style = f"abandoned: {r.reason or 'no reason given'}", "red"
            else:
                status, style = "committed", ""
            table.add_row(
                str(r.round),
                str(r.selected),
                str(r.reported),
                str(r.dropped),
                _fmt(r.loss, ".4f"),
                _fmt(r.accuracy, ".2%"),
                f"{r.seconds:.2f}",
                status,
                style=style,
            )
        if running is not None:
            round_, selected = running
            table.add_row(str(round_), str(selected), "", "", "", "", "", "running", style="dim")
        return Group(table, self._progress)


def make_progress(total_rounds: int, console: Console) -> ProgressDisplay:
    """The live display when ``console`` writes to a terminal, else one line per round."""
    if console.is_terminal:
        return LiveProgress(total_rounds, console)
    return LineProgress(total_rounds, console)
