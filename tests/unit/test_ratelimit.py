"""The selector's token buckets (fedfleet.selector.ratelimit): pure, time passed in."""

from __future__ import annotations

import pytest

from fedfleet.selector.ratelimit import RateLimit, RateLimiter, retry_after

pytestmark = pytest.mark.unit


def test_a_burst_then_the_sustained_rate() -> None:
    limiter = RateLimiter(RateLimit(rate=1.0, burst=5))
    assert [limiter.take("d", 100.0) for _ in range(5)] == [0.0] * 5
    wait = limiter.take("d", 100.0)
    assert wait == pytest.approx(1.0)
    assert limiter.take("d", 100.5) == pytest.approx(0.5)  # a refusal spends nothing
    assert limiter.take("d", 101.0) == 0.0
    assert limiter.take("d", 101.0) > 0
    # a long quiet spell refills to the burst, never beyond
    assert [limiter.take("d", 1000.0) for _ in range(6)].count(0.0) == 5


def test_buckets_are_per_key() -> None:
    limiter = RateLimiter(RateLimit(rate=0.1, burst=1))
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) == pytest.approx(10.0)
    assert limiter.take("b", 0.0) == 0.0


def test_the_number_of_buckets_is_bounded_least_recent_first() -> None:
    limiter = RateLimiter(RateLimit(rate=0.001, burst=1), max_keys=3)
    for key in ("a", "b", "c"):
        assert limiter.take(key, 0.0) == 0.0
    assert limiter.take("a", 0.0) > 0  # "a" is now the most recent
    assert limiter.take("d", 0.0) == 0.0  # evicts "b", the least recent
    assert len(limiter) == 3
    assert limiter.take("a", 0.0) > 0 and limiter.take("c", 0.0) > 0
    assert limiter.take("b", 0.0) == 0.0  # forgotten: starts afresh


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after(w) for w in (0.01, 1.0, 1.2, 59.9)] == ["1", "1", "2", "60"]


def test_a_limit_needs_a_positive_rate_and_a_burst() -> None:
    with pytest.raises(ValueError):
        RateLimit(0, 5)
    with pytest.raises(ValueError):
        RateLimit(1, 0.5)
