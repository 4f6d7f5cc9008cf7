"""Pace steering in both regimes, against a simulated population of devices.

The check-in rate the windows produce is measured by simulating devices that come back at a
uniform time inside the window they were given (as the runtime does).
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest

from fedfleet.core.pacing import PaceSteering

pytestmark = pytest.mark.unit


def _simulate(
    population: int, target_rate: float, seconds: float, *, round_share: int, seed: int = 0
) -> tuple[PaceSteering, list[float]]:
    rng = np.random.default_rng(seed)
    pacer = PaceSteering(interval=60.0)
    heap = [(float(t), i) for i, t in enumerate(rng.uniform(0, 600, population))]
    heapq.heapify(heap)
    arrivals: list[float] = []
    next_update = 0.0
    while heap:
        t, dev = heapq.heappop(heap)
        if t > seconds:
            break
        while next_update <= t:
            pacer.update(next_update, target_rate)
            next_update += 10.0
        pacer.observe(t)
        arrivals.append(t)
        w = pacer.window(t, round_share=round_share, next_open=-1.0)
        heapq.heappush(heap, (float(rng.uniform(w.not_before, w.not_after)), dev))
    return pacer, arrivals


@pytest.mark.parametrize(("population", "target"), [(20_000, 5.0), (5_000, 2.0), (2_000, 1.0)])
def test_large_population_check_in_rate_converges_to_the_target(
    population: int, target: float
) -> None:
    horizon = 4 * 3600.0
    pacer, arrivals = _simulate(population, target, horizon, round_share=10)
    late = [t for t in arrivals if t >= horizon / 2]
    rate = len(late) / (horizon / 2)
    assert rate == pytest.approx(target, rel=0.2)
    # Little's law estimate of the cycling population is close to the real one.
    assert pacer.population == pytest.approx(population, rel=0.3)


def test_rate_follows_a_daily_swing() -> None:
    """Halve the population mid-run (the evening trough): the rate recovers to the target."""
    rng = np.random.default_rng(1)
    pacer = PaceSteering(interval=60.0)
    n, target, horizon = 20_000, 5.0, 6 * 3600.0
    heap = [(float(t), i) for i, t in enumerate(rng.uniform(0, 600, n))]
    heapq.heapify(heap)
    arrivals: list[float] = []
    next_update = 0.0
    while heap:
        t, dev = heapq.heappop(heap)
        if t > horizon:
            break
        if t > horizon / 3 and dev % 2 == 1:
            continue  # half the fleet goes offline for good
        while next_update <= t:
            pacer.update(next_update, target)
            next_update += 10.0
        pacer.observe(t)
        arrivals.append(t)
        w = pacer.window(t, round_share=10, next_open=-1.0)
        heapq.heappush(heap, (float(rng.uniform(w.not_before, w.not_after)), dev))
    late = [t for t in arrivals if t >= 2 * horizon / 3]
    assert len(late) / (horizon / 3) == pytest.approx(target, rel=0.25)


def test_large_population_windows_are_spread_not_a_herd() -> None:
    pacer = PaceSteering(mean_delay=600.0, population=1e6)
    w = pacer.window(100.0, round_share=10, next_open=50.0)
    assert w.not_after - w.not_before >= 0.9 * 600.0
    assert w.not_before >= 100.0 + pacer.min_delay


def test_small_population_windows_concentrate_at_the_next_selection() -> None:
    """30 devices, 26 needed per round: everyone should be back right when selection opens."""
    rng = np.random.default_rng(2)
    pacer = PaceSteering(interval=60.0)
    times = rng.uniform(0, 100, 30)
    for t in sorted(times):
        pacer.observe(float(t))
    pacer.update(0.0, 1.0)
    pacer.update(100.0, 1.0)
    assert pacer.small_population(26)
    next_open = 400.0
    returns = []
    for t in sorted(times):
        w = pacer.window(100.0 + float(t), round_share=26, next_open=next_open)
        returns.append(rng.uniform(w.not_before, w.not_after))
    in_window = [r for r in returns if next_open <= r <= next_open + pacer.concentrate_jitter]
    assert len(in_window) == 30


def test_small_population_windows_follow_rounds_shorter_than_the_default_delays() -> None:
    """Rounds of 0.2 s: a device sent away comes back within about a round, not after the
    seconds-long defaults that would let several rounds pass without it; a large population
    and an unmeasured round keep the usual windows."""
    pacer = PaceSteering()
    assert pacer.small_population(5)
    open_now = pacer.window(100.0, round_share=5, next_open=100.0, round_seconds=0.2)
    assert 100.0 < open_now.not_before <= 100.2 and open_now.not_after <= 100.0 + 0.4
    later = pacer.window(100.0, round_share=5, next_open=100.1, round_seconds=0.2)
    assert later.not_before == 100.1 and later.not_after <= 100.1 + 0.2 + 1e-9
    unknown = pacer.window(100.0, round_share=5, next_open=100.0)
    assert unknown.not_before == 100.0 + pacer.min_delay
    assert unknown.not_after == unknown.not_before + pacer.concentrate_jitter
    large = PaceSteering(mean_delay=600.0, population=1e6)
    w = large.window(100.0, round_share=5, next_open=100.0, round_seconds=0.2)
    assert w.not_before >= 100.0 + large.min_delay


def test_windows_bounded_by_short_rounds_count_in_the_population_estimate() -> None:
    """Little's law with the delays handed out: 10 check-ins a second, each sent back for
    about 0.2 s, is a population of about 2 — not 10 x the 60 s default delay, which would
    switch to spread-out windows and send everyone away for minutes."""
    pacer = PaceSteering(interval=1.0)
    for i in range(300):
        now = i / 10.0
        pacer.observe(now)
        pacer.window(now, round_share=5, next_open=now, round_seconds=0.2)
    pacer.update(0.0, 10.0)
    pacer.update(30.0, 10.0)
    assert pacer.observed_rate == pytest.approx(10.0)
    assert pacer.population == pytest.approx(2.0, rel=0.01)
    assert pacer.small_population(5)
    unbounded = PaceSteering(interval=1.0)
    for i in range(300):
        unbounded.observe(i / 10.0)
        unbounded.window(i / 10.0, round_share=5, next_open=i / 10.0)
    unbounded.update(0.0, 10.0)
    unbounded.update(30.0, 10.0)
    assert unbounded.population == pytest.approx(10.0 * 60.0)  # as before: rate x T


def test_short_rounds_send_each_device_to_a_coming_opening_with_room() -> None:
    """Rounds of 0.1 s: the devices not needed now are shared out over the coming selection
    openings, at most ``opening_headroom x share`` each, and each is told to arrive just after
    its opening (expected one round apart from the coordinator's ``next_opening``)."""
    pacer = PaceSteering()
    share, now, opening = 5, 100.0, 100.04
    places = math.ceil(pacer.opening_headroom * share)
    windows = [
        pacer.window(
            now,
            round_share=share,
            next_open=now,
            round_seconds=0.1,
            device_id=f"d{i}",
            next_attempt=7,
            next_opening=opening,
        )
        for i in range(35)
    ]
    starts = [round(w.not_before, 6) for w in windows]
    openings = math.ceil(35 / places)
    expected = {round(opening + k * 0.1, 6): min(places, 35 - k * places) for k in range(openings)}
    assert {s: starts.count(s) for s in set(starts)} == expected
    assert all(w.not_after - w.not_before == pytest.approx(0.025) for w in windows)
    assert all(w.reason == "not-needed" for w in windows)


def test_a_device_that_comes_early_keeps_its_opening() -> None:
    """The round ran late: a device back before its opening is sent to the same opening again,
    and it does not take a second place there; once that opening has passed (the next attempt
    is a later one), the places are counted afresh."""
    pacer = PaceSteering(opening_headroom=1.0)
    kw = {"round_share": 2, "next_open": 0.0, "round_seconds": 0.1}
    first = pacer.window(10.0, device_id="a", next_attempt=3, next_opening=10.1, **kw)
    pacer.window(10.0, device_id="b", next_attempt=3, next_opening=10.1, **kw)
    late = pacer.window(10.0, device_id="c", next_attempt=3, next_opening=10.1, **kw)
    assert first.not_before == pytest.approx(10.1) and late.not_before == pytest.approx(10.2)
    again = pacer.window(10.12, device_id="a", next_attempt=3, next_opening=10.15, **kw)
    assert again.not_before == pytest.approx(10.15)  # the same opening, now expected later
    newcomer = pacer.window(10.12, device_id="d", next_attempt=3, next_opening=10.15, **kw)
    assert newcomer.not_before == pytest.approx(10.25)  # 3 is full (a, b): 4, beside c
    moved_on = pacer.window(10.3, device_id="e", next_attempt=4, next_opening=10.4, **kw)
    assert moved_on.not_before == pytest.approx(10.5)  # 4 is full (c, d): 5
    assert pacer._openings.keys() >= {4, 5} and 3 not in pacer._openings


def test_openings_only_for_short_rounds_and_known_devices() -> None:
    """Rounds as long as the default delays, an unknown next attempt or no device id keep the
    regimes above; a device is never told to come back before ``now``."""
    kw = {"round_share": 5, "next_open": 100.0, "device_id": "x", "next_attempt": 2}
    long_rounds = PaceSteering().window(100.0, round_seconds=30.0, next_opening=130.0, **kw)
    assert long_rounds.not_before == 100.0 + 2.0  # min(min_delay, round_seconds / 2) later
    no_attempt = PaceSteering().window(
        100.0, round_share=5, next_open=100.0, round_seconds=0.1, device_id="x"
    )
    assert no_attempt.not_after <= 100.0 + 0.05 + 0.1 + 1e-9
    assert not PaceSteering()._promised
    passed = PaceSteering().window(100.0, round_seconds=0.1, next_opening=99.0, **kw)
    assert passed.not_before == pytest.approx(100.025)  # the opening is due: right after now
