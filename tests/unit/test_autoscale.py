"""The aggregator pool's sizing rule, its hysteresis, and an aggregator's measured load."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedfleet.core.autoscale import (
    Direction,
    LoadWindow,
    PoolLoad,
    PoolPolicy,
    ScaleState,
    decide,
    round_aggregator_limit,
    size_pool,
    update_bytes,
)
from fedfleet.core.spec import FLJobSpec, ManifestError, parse_manifest

MiB = 1024 * 1024


def _spec(**actors: Any) -> FLJobSpec:
    doc = {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": "j"},
        "spec": {
            "population": "p",
            "rounds": {"goalCount": 100, "overSelection": 1.3},
            "fleet": {"devices": 1000},
            "actors": {"devicesPerAggregator": 50, "maxAggregators": 16, **actors},
        },
    }
    return parse_manifest(doc).spec


def _policy(**actors: Any) -> PoolPolicy:
    return PoolPolicy.of(_spec(**actors))


def _load(update: int, *, devices: int = 130, seconds: float = 10.0, **kw: Any) -> PoolLoad:
    return PoolLoad(selected_devices=devices, update_bytes=update, round_seconds=seconds, **kw)


def test_update_bytes_are_float32_values_of_the_shapes() -> None:
    assert update_bytes([(64, 10), (10,)]) == 4 * 650


def test_devices_alone_give_the_old_rule() -> None:
    policy = _policy()
    sizing = size_pool(policy, _load(0))
    assert sizing.count == math.ceil(130 / 50) == 3
    assert sizing.reason == "devices"
    assert _spec().actors.aggregator_count(_spec().rounds) == 3


def test_a_ten_times_larger_model_needs_more_aggregators() -> None:
    policy = _policy(aggregatorBytesPerSecond=10 * MiB)
    small = size_pool(policy, _load(MiB // 2))  # 130 x 0.5 MiB / 10 s = 6.5 MiB/s: 1 by bytes
    large = size_pool(policy, _load(5 * MiB))  # 65 MiB/s: 7 by bytes
    assert small.count == 3 and small.reason == "devices"
    assert large.count == 7 and large.reason == "bytes"
    assert large.by_bytes == math.ceil(130 * 5 * MiB / 10 / (10 * MiB))


def test_measured_rates_count_when_they_exceed_the_prediction() -> None:
    policy = _policy(aggregatorBytesPerSecond=10 * MiB)
    predicted = size_pool(policy, _load(MiB // 2))
    measured = size_pool(policy, _load(MiB // 2, measured_bytes_per_second=55 * MiB))
    assert measured.count == 6 > predicted.count
    slow = size_pool(policy, _load(MiB // 2, measured_fold_bytes_per_second=2 * MiB))
    assert slow.capacity == 2 * MiB and slow.count == 4  # 6.5 MiB/s at 2 MiB/s each
    fast = size_pool(policy, _load(MiB // 2, measured_fold_bytes_per_second=1000 * MiB))
    assert fast.capacity == 10 * MiB  # never above what the spec counts on


def test_bounds_and_the_round_limit() -> None:
    huge = _load(100 * MiB)
    assert size_pool(_policy(maxAggregators=5), huge).count == 5
    assert size_pool(_policy(maxAggregators=5), huge).reason == "maxAggregators"
    at_least = size_pool(_policy(minAggregators=4), _load(0))
    assert (at_least.count, at_least.reason) == (4, "minAggregators")
    # Secure aggregation: 80 minimum reports in groups of at least 20 -> 4 groups at most.
    spec = parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "j"},
            "spec": {
                "population": "p",
                "rounds": {"goalCount": 100},
                "fleet": {"devices": 1000},
                "aggregation": {"secureAggregation": {"enabled": True, "minGroupSize": 20}},
                "actors": {"devicesPerAggregator": 50},
            },
        }
    ).spec
    assert round_aggregator_limit(spec) == 4
    limited = size_pool(PoolPolicy.of(spec), huge)
    assert (limited.count, limited.reason) == (4, "roundLimit")


def test_min_above_max_is_refused() -> None:
    with pytest.raises(ManifestError, match="minAggregators"):
        _spec(minAggregators=5, maxAggregators=4)


def test_scales_up_at_once() -> None:
    policy = _policy(aggregatorBytesPerSecond=10 * MiB)
    d = decide(policy, ScaleState(3), _load(5 * MiB), now=0.0)
    assert (d.direction, d.replicas) == (Direction.up, 7)
    assert d.state == ScaleState(7)


def test_scales_down_only_after_the_load_stayed_low_for_the_window() -> None:
    policy = _policy(aggregatorBytesPerSecond=10 * MiB, scaleDownStabilizationSeconds=60)
    low = _load(MiB // 2)  # needs 3 (devices)
    state = ScaleState(7)
    d = decide(policy, state, low, now=100.0)
    assert (d.direction, d.replicas) == (Direction.hold, 7)
    assert d.state.low_since == 100.0
    d = decide(policy, d.state, low, now=159.0)
    assert d.direction is Direction.hold and d.state.low_since == 100.0
    d = decide(policy, d.state, low, now=160.0)
    assert (d.direction, d.replicas) == (Direction.down, 4)  # 130 devices / (50 x 0.7) -> 4
    assert d.state == ScaleState(d.replicas)


def test_a_load_spike_in_the_window_resets_it_and_the_largest_recommendation_wins() -> None:
    policy = _policy(aggregatorBytesPerSecond=10 * MiB, scaleDownStabilizationSeconds=60)
    state = ScaleState(7)
    d = decide(policy, state, _load(MiB // 2), now=0.0)
    # Back within the band: 45.5 MiB/s needs 5 at full capacity and 7 at 70%.
    d = decide(policy, d.state, _load(int(3.5 * MiB)), now=30.0)
    assert d.direction is Direction.hold and d.state.low_since is None
    d = decide(policy, d.state, _load(MiB // 2), now=40.0)
    assert d.state.low_since == 40.0
    d = decide(policy, d.state, _load(int(2.5 * MiB)), now=70.0)  # fits 5 at 70%
    d = decide(policy, d.state, _load(MiB // 2), now=100.0)
    assert (d.direction, d.replicas) == (Direction.down, 5)


def test_no_flapping_between_the_thresholds() -> None:
    """A load that alternates around one pool's capacity keeps the pool where it is."""
    policy = _policy(aggregatorBytesPerSecond=10 * MiB, scaleDownStabilizationSeconds=0)
    replicas = 5
    state = ScaleState(replicas)
    moves = []
    for i in range(40):
        update = int((3.5 if i % 2 else 3.0) * MiB)  # 45.5 and 39 MiB/s: 5 and 4 at full
        d = decide(policy, state, _load(update), now=float(i))
        state = d.state
        moves.append(d.direction)
    assert set(moves) == {Direction.hold}


def test_a_lowered_bound_shrinks_at_once() -> None:
    policy = _policy(maxAggregators=4)
    d = decide(policy, ScaleState(9), _load(0), now=0.0)
    assert (d.direction, d.replicas) == (Direction.down, 4)


def test_load_window_rates() -> None:
    w = LoadWindow(seconds=10.0)
    assert w.rates(0.0)["fold_bytes_per_second"] is None
    for t in range(10):
        w.add(float(t), 1000, 0.01)
    r = w.rates(9.0)
    assert r["reports_per_second"] == pytest.approx(10 / 9)
    assert r["bytes_per_second"] == pytest.approx(10_000 / 9)
    assert r["fold_bytes_per_second"] == pytest.approx(1000 / 0.01)
    assert r["fold_utilization"] == pytest.approx(0.1 / 9)
    later = w.rates(100.0)  # the window forgets
    assert later["reports_per_second"] == 0 and later["fold_bytes_per_second"] is None
