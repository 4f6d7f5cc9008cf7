"""Round selection and closing policy: quotas, over-selection, minimums and timeouts.

Pure decisions over counts and times. The coordinator calls :func:`selection_outcome` and
:func:`reporting_outcome` on every tick; selectors call :func:`split_quota`'s result locally.
Nothing here is committed anywhere: an abandoned round simply gets a new attempt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

from fedfleet.core.protocol import RoundState

__all__ = ["Outcome", "reporting_outcome", "selection_outcome", "split_quota"]


class Outcome(StrEnum):
    wait = "wait"
    """Keep going: neither the target nor the deadline was reached."""
    proceed = "proceed"
    """Selection reached its target, or the deadline with at least the minimum."""
    close = "close"
    """Reporting reached the goal, or the deadline with at least the minimum."""
    abandon = "abandon"
    """Deadline passed below the minimum (or the minimum became unreachable)."""


def split_quota(remaining: int, selectors: Sequence[str]) -> dict[str, int]:
    """Share the selections still needed among live selectors.

    Each gets ``ceil(remaining / n)``: devices check in at random selectors, so an exact split
    would stall on the selector that happens to see fewer devices. The overshoot is bounded by
    ``n - 1`` devices per push, and the coordinator re-splits what remains on every tick.
    """
    if remaining <= 0 or not selectors:
        return dict.fromkeys(selectors, 0)
    share = math.ceil(remaining / len(selectors))
    return dict.fromkeys(selectors, share)


def selection_outcome(state: RoundState, selected: int, now: float) -> Outcome:
    if selected >= state.target:
        return Outcome.proceed
    if now >= state.selection_deadline:
        return Outcome.proceed if selected >= state.minimum else Outcome.abandon
    return Outcome.wait


def reporting_outcome(
    state: RoundState, reported: int, now: float, *, outstanding: int | None = None
) -> Outcome:
    """Decide whether a reporting round closes, waits or is abandoned.

    ``outstanding`` is the number of selected devices still alive and not yet reported, when
    known; if even all of them could not lift the round to its minimum, waiting is pointless.
    """
    if reported >= state.goal:
        return Outcome.close
    if now >= state.reporting_deadline:
        return Outcome.close if reported >= state.minimum else Outcome.abandon
    if outstanding is not None and outstanding == 0:
        return Outcome.close if reported >= state.minimum else Outcome.abandon
    return Outcome.wait
