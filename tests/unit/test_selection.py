"""Selection policy: over-selection, quotas, timeouts and abandonment below the minimum."""

from __future__ import annotations

import pytest

from fedfleet.core.protocol import Phase, RoundState
from fedfleet.core.selection import Outcome, reporting_outcome, selection_outcome, split_quota
from fedfleet.core.spec import RoundsSpec

pytestmark = pytest.mark.unit


def _state(policy: RoundsSpec, now: float = 0.0) -> RoundState:
    return RoundState(
        round=1,
        attempt=1,
        phase=Phase.selecting,
        target=policy.selection_target,
        goal=policy.goal_count,
        minimum=policy.minimum_count,
        selection_deadline=now + policy.selection_timeout_seconds,
        reporting_deadline=now + policy.reporting_timeout_seconds,
    )


def test_over_selection_targets_130_percent_of_goal_rounded_up() -> None:
    assert RoundsSpec(goal_count=10).selection_target == 13
    assert RoundsSpec(goal_count=100).selection_target == 130
    assert RoundsSpec(goal_count=7, over_selection=1.3).selection_target == 10  # 9.1 -> 10
    assert RoundsSpec(goal_count=10, over_selection=1.0).selection_target == 10


def test_minimum_is_a_fraction_of_goal() -> None:
    assert RoundsSpec(goal_count=10, min_report_fraction=0.8).minimum_count == 8
    assert RoundsSpec(goal_count=10, min_report_fraction=1.0).minimum_count == 10
    assert RoundsSpec(goal_count=3, min_report_fraction=0.1).minimum_count == 1


def test_selection_proceeds_at_target_before_the_deadline() -> None:
    s = _state(RoundsSpec(goal_count=10))
    assert selection_outcome(s, 12, now=5.0) is Outcome.wait
    assert selection_outcome(s, 13, now=5.0) is Outcome.proceed


def test_selection_timeout_proceeds_with_at_least_the_minimum() -> None:
    s = _state(RoundsSpec(goal_count=10, selection_timeout_seconds=60))
    assert selection_outcome(s, 9, now=59.9) is Outcome.wait
    assert selection_outcome(s, 8, now=60.0) is Outcome.proceed


def test_selection_timeout_below_minimum_abandons() -> None:
    s = _state(RoundsSpec(goal_count=10, selection_timeout_seconds=60))
    assert selection_outcome(s, 7, now=60.0) is Outcome.abandon
    assert selection_outcome(s, 0, now=1e9) is Outcome.abandon


def test_reporting_closes_at_goal_count_and_ignores_the_over_selected_rest() -> None:
    s = _state(RoundsSpec(goal_count=10))
    assert reporting_outcome(s, 9, now=1.0) is Outcome.wait
    assert reporting_outcome(s, 10, now=1.0) is Outcome.close


def test_reporting_timeout_commits_above_minimum_and_abandons_below() -> None:
    s = _state(RoundsSpec(goal_count=10, reporting_timeout_seconds=120))
    assert reporting_outcome(s, 8, now=120.0) is Outcome.close
    assert reporting_outcome(s, 7, now=120.0) is Outcome.abandon


def test_reporting_stops_waiting_when_no_device_is_left() -> None:
    s = _state(RoundsSpec(goal_count=10))
    assert reporting_outcome(s, 5, now=1.0, outstanding=2) is Outcome.wait
    assert reporting_outcome(s, 5, now=1.0, outstanding=0) is Outcome.abandon
    assert reporting_outcome(s, 9, now=1.0, outstanding=0) is Outcome.close


def test_split_quota_never_undershoots_and_overshoots_by_less_than_one_per_selector() -> None:
    for remaining in range(40):
        for n in range(1, 6):
            shares = split_quota(remaining, [f"s{i}" for i in range(n)])
            assert len(shares) == n
            total = sum(shares.values())
            assert remaining <= total <= remaining + n - 1 if remaining else total == 0
    assert split_quota(5, []) == {}
