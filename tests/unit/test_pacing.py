"""Pace steering in both regimes, against a simulated population of devices.

The check-in rate the windows produce is measured by simulating devices that come back at a
uniform time inside the window they were given (as the runtime does).
"""

from __future__ import annotations

import heapq

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
