"""The simulated fleet's rest after a report: in seconds, and in rounds it measures."""

from __future__ import annotations

import math

import pytest

from fedfleet.device.http_fleet import RoundClock, rest_delay

pytestmark = pytest.mark.unit


def test_round_clock_measures_new_rounds_only() -> None:
    clock = RoundClock()
    clock.observe("a1", 10.0)
    assert math.isnan(clock.interval)  # one round seen: no interval yet
    clock.observe("a1", 11.0)  # more tasks of the same round
    clock.observe("a2", 14.0)
    assert clock.interval == pytest.approx(4.0)
    clock.observe("a1", 15.0)  # a late task of an earlier round is not a new round
    assert clock.interval == pytest.approx(4.0)
    clock.observe("a3", 16.0)  # smoothed toward the new 2 s gap
    assert clock.interval == pytest.approx(0.7 * 4.0 + 0.3 * 2.0)


def test_rest_is_the_longer_of_seconds_and_rounds() -> None:
    assert rest_delay(2.0, None, 4.0) == 2.0  # no rest in rounds asked for
    assert rest_delay(2.0, 1.5, math.nan) == 2.0  # no interval measured yet
    assert rest_delay(2.0, 1.5, 4.0) == pytest.approx(6.0)  # slow rounds: rest in rounds
    assert rest_delay(2.0, 1.5, 0.5) == 2.0  # fast rounds: the seconds are longer
