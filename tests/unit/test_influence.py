"""Unit tests of the influence bounds (fedfleet.core.influence) and the pre-commit check."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.core.commitcheck import CommitRefused, check_commit
from fedfleet.core.dp import update_norm
from fedfleet.core.influence import (
    BoundedFold,
    InfluenceHistory,
    InfluencePolicy,
    RobustFold,
    make_fold,
    trimmed_mean,
)
from fedfleet.core.spec import RobustAggregator, RobustnessSpec

pytestmark = pytest.mark.unit

SHAPES: list[tuple[int, ...]] = [(3, 2), (2,)]


def _u(value: float) -> list[np.ndarray]:
    return [np.full(s, value, dtype=np.float32) for s in SHAPES]


def _mean(fold: BoundedFold | RobustFold) -> list[np.ndarray]:
    return fold.finish().mean()


def test_history_caps_follow_the_median_not_the_liar() -> None:
    h = InfluenceHistory(window=10)
    assert h.weight_cap(2.0) is None and h.norm_bound(2.0, 0.5) is None
    for n in (7, 6, 8, 1_000_000, 7):
        h.record(n, 1.0)
    assert h.weight_cap(2.0) == 14.0
    assert h.weight_cap(None) is None
    h.record(5, 3e38)
    assert h.norm_bound(2.0, 0.5) == 2.0
    with pytest.raises(ValueError):
        h.record(0, 1.0)
    with pytest.raises(ValueError):
        h.record(5, float("inf"))


def test_history_window_forgets_old_reports() -> None:
    h = InfluenceHistory(window=3)
    for n in (100, 100, 100, 1, 1, 1):
        h.record(n, 1.0)
    assert len(h) == 3
    assert h.weight_cap(1.0) == 1.0


def test_bounded_fold_caps_weight_and_clips_norm() -> None:
    policy = InfluencePolicy(weight_cap_multiple=2.0, adaptive_norm_multiple=2.0, warmup=0)
    fold = BoundedFold(SHAPES, policy, InfluenceHistory(16))
    for _ in range(4):
        fold.add(_u(1.0), 10)
    liar = _u(3e38)
    fold.add(liar, 1_000_000)
    assert fold.capped == 1 and fold.clipped == 1
    total = fold.finish()
    assert total.count == 5
    assert total.total_weight == 4 * 10 + 20  # the liar weighs 2 x the median count
    honest_norm = update_norm(_u(1.0))
    mean = total.mean()
    # the liar's update was scaled to 2 x the median norm: the mean moved by at most that share
    moved = update_norm([m - h for m, h in zip(mean, _u(1.0), strict=True)])
    assert moved <= (20 / 60) * 3 * honest_norm + 1e-5
    assert all(np.isfinite(a).all() for a in mean)


def test_bounded_fold_holds_reports_until_the_history_is_warm() -> None:
    policy = InfluencePolicy(weight_cap_multiple=2.0, adaptive_norm_multiple=2.0, warmup=3)
    fold = BoundedFold(SHAPES, policy, InfluenceHistory(16))
    liar = _u(1e30)
    fold.add(liar, 1_000_000)  # the very first report lies: it is held, not folded
    fold.add(_u(1.0), 5)
    assert fold.count == 2 and fold.sum.count == 0
    liar[0][:] = 0  # held reports are copies, not views of the request body
    fold.add(_u(1.0), 5)
    assert fold.sum.count == 3
    total = fold.finish()
    assert total.total_weight == 5 + 5 + 10  # median 5 x 2
    assert update_norm(total.mean()) < 10 * update_norm(_u(1.0))


def test_bounded_fold_finishes_with_a_cold_history() -> None:
    policy = InfluencePolicy(weight_cap_multiple=2.0, adaptive_norm_multiple=2.0, warmup=10)
    fold = BoundedFold(SHAPES, policy, InfluenceHistory(16))
    fold.add(_u(1.0), 4)
    fold.add(_u(1.0), 4)
    fold.add(_u(50.0), 400)
    total = fold.finish()
    assert total.count == 3 and total.total_weight == 16.0


def test_fixed_norm_bound_wins_over_the_adaptive_one() -> None:
    policy = InfluencePolicy(norm_bound=0.5, adaptive_norm_multiple=2.0, warmup=0)
    fold = BoundedFold(SHAPES, policy, InfluenceHistory(4))
    fold.add(_u(1.0), 1)
    assert update_norm(_mean(fold)) <= 0.5


def test_no_bounds_weigh_by_claimed_count() -> None:
    policy = InfluencePolicy(weight_cap_multiple=None, adaptive_norm_multiple=None, warmup=0)
    fold = BoundedFold(SHAPES, policy, InfluenceHistory(4))
    fold.add(_u(1.0), 1)
    fold.add(_u(-1.0), 1_000_000)
    assert fold.capped == fold.clipped == 0
    assert fold.finish().total_weight == 1_000_001


def test_trimmed_mean_drops_extremes_per_coordinate() -> None:
    stacked = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, -1e30], [1e30, 30.0]], dtype=np.float32)
    got = trimmed_mean(stacked, 0.25)
    np.testing.assert_allclose(got, [2.5, 15.0])
    np.testing.assert_allclose(trimmed_mean(stacked[:1], 0.4), stacked[0])
    with pytest.raises(ValueError):
        trimmed_mean(stacked, 0.5)


@pytest.mark.parametrize("method", [RobustAggregator.trimmed_mean, RobustAggregator.median])
def test_robust_fold_ignores_a_minority_of_outliers(method: RobustAggregator) -> None:
    policy = InfluencePolicy(adaptive_norm_multiple=None, warmup=0)
    fold = RobustFold(SHAPES, policy, InfluenceHistory(16), method=method, trim_fraction=0.2)
    for v in (1.0, 1.1, 0.9, 1.0):
        fold.add(_u(v), 5)
    fold.add(_u(3e38), 1_000_000)
    total = fold.finish()
    assert total.count == 5 and total.total_weight == 5.0  # every report weighs 1
    for arr in total.mean():
        assert np.all((arr > 0.89) & (arr < 1.11))


def test_make_fold_follows_the_spec() -> None:
    history = InfluenceHistory(8)
    assert isinstance(make_fold(SHAPES, RobustnessSpec(), history), BoundedFold)
    spec = RobustnessSpec.model_validate({"aggregator": "median"})
    assert isinstance(make_fold(SHAPES, spec, history), RobustFold)
    assert (
        RobustFold(
            SHAPES, InfluencePolicy(), history, method=RobustAggregator.median, trim_fraction=0.1
        )
        .finish()
        .count
        == 0
    )


def test_pre_commit_check() -> None:
    old = _u(1.0)
    assert check_commit(old, _u(2.0), max_norm_ratio=10.0) == pytest.approx(update_norm(_u(2.0)))
    with pytest.raises(CommitRefused, match="maxModelNormRatio"):
        check_commit(old, _u(100.0), max_norm_ratio=10.0)
    check_commit(old, _u(100.0), max_norm_ratio=None)
    with pytest.raises(CommitRefused, match="NaN or infinity"):
        check_commit(
            old, [*_u(1.0)[:1], np.array([np.nan, 1.0], dtype=np.float32)], max_norm_ratio=None
        )
    huge = [np.full(s, 3e38, dtype=np.float32) for s in SHAPES]
    with pytest.raises(CommitRefused, match="exceeds 10"):
        check_commit(old, huge, max_norm_ratio=10.0)
    # a zero initial model counts as norm 1, so a first round may leave zero
    zero = _u(0.0)
    check_commit(zero, _u(1.0), max_norm_ratio=10.0)
    with pytest.raises(CommitRefused):
        check_commit(zero, _u(10.0), max_norm_ratio=2.0)
    with pytest.raises(CommitRefused, match="shape"):
        check_commit(
            old, [np.zeros((2, 3), np.float32), np.zeros(2, np.float32)], max_norm_ratio=None
        )
