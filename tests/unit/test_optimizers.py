"""Unit tests of fedfleet.core.optimizers: the update rules of Reddi et al. and exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedfleet.core.optimizers import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    make_server_optimizer,
)
from fedfleet.core.serde import decode_state, encode_state
from fedfleet.core.spec import AggregationSpec, Algorithm

pytestmark = pytest.mark.unit

SHAPES: list[tuple[int, ...]] = [(3, 2), (2,)]


def _arrays(rng: np.random.Generator, dtype: type = np.float32) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def test_fedavg_with_unit_rate_adds_the_delta() -> None:
    rng = np.random.default_rng(0)
    weights, mean_delta = _arrays(rng), _arrays(rng)
    saved = [w.copy() for w in weights], [d.copy() for d in mean_delta]
    opt = make_server_optimizer(AggregationSpec(algorithm=Algorithm.fedavg), SHAPES)
    out = opt.step(weights, mean_delta)
    for o, w, d in zip(out, weights, mean_delta, strict=True):
        assert o.dtype == np.float32
        np.testing.assert_array_equal(o, w + d)
    assert all(np.array_equal(a, b) for a, b in zip(weights, saved[0], strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(mean_delta, saved[1], strict=True))
    half = FedAvg(SHAPES, 0.5).step(weights, mean_delta)
    np.testing.assert_allclose(half[0], weights[0] + 0.5 * mean_delta[0], rtol=1e-6)


def test_fedavgm_momentum_accumulates() -> None:
    weights = [np.zeros(s, np.float32) for s in SHAPES]
    d = [np.ones(s, np.float32) for s in SHAPES]
    opt = FedAvgM(SHAPES, learning_rate=0.5, momentum=0.9)
    w = weights
    total = 0.0
    for m in (1.0, 1.9, 2.71):
        w = opt.step(w, d)
        total += 0.5 * m
        np.testing.assert_allclose(w[0], total, rtol=1e-6)
    np.testing.assert_allclose(opt.state()["m/0"], 2.71)


@pytest.mark.parametrize("algorithm", [Algorithm.fedadam, Algorithm.fedyogi])
def test_adaptive_optimizers_match_hand_computation(algorithm: Algorithm) -> None:
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    spec = AggregationSpec(
        algorithm=algorithm, server_learning_rate=lr, beta1=b1, beta2=b2, tau=tau
    )
    opt = make_server_optimizer(spec, [(2,)])
    w = [np.array([1.0, -2.0], np.float32)]
    deltas = [[0.5, -0.01], [-0.2, 0.3]]
    m = [0.0, 0.0]
    v = [tau**2, tau**2]
    expected = [1.0, -2.0]
    for step in deltas:
        for j, dj in enumerate(step):
            m[j] = b1 * m[j] + (1 - b1) * dj
            if algorithm is Algorithm.fedadam:
                v[j] = b2 * v[j] + (1 - b2) * dj**2
            else:
                v[j] = v[j] - (1 - b2) * dj**2 * math.copysign(1.0, v[j] - dj**2)
            expected[j] += lr * m[j] / (math.sqrt(v[j]) + tau)
        w = opt.step(w, [np.array(step, np.float32).astype(np.float64)])
        np.testing.assert_allclose(w[0], expected, rtol=1e-6)
    state = opt.state()
    np.testing.assert_allclose(state["m/0"], m, rtol=1e-6)
    np.testing.assert_allclose(state["v/0"], v, rtol=1e-6)
    assert int(state["step"]) == 2


def test_yogi_and_adam_differ_once_v_exceeds_delta_squared() -> None:
    adam = FedAdam(SHAPES, 1.0, beta1=0.9, beta2=0.5, tau=1e-3)
    yogi = FedYogi(SHAPES, 1.0, beta1=0.9, beta2=0.5, tau=1e-3)
    w = [np.zeros(s, np.float32) for s in SHAPES]
    big = [np.full(s, 2.0, np.float32) for s in SHAPES]
    small = [np.full(s, 0.1, np.float32) for s in SHAPES]
    for opt in (adam, yogi):
        opt.step(opt.step(w, big), small)
    # Yogi shrinks v additively (by (1-b2) d**2), Adam multiplicatively (by b2).
    assert yogi.state()["v/0"][0, 0] > adam.state()["v/0"][0, 0]


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_state_round_trip_resumes_exactly(algorithm: Algorithm) -> None:
    rng = np.random.default_rng(1)
    spec = AggregationSpec(algorithm=algorithm, server_learning_rate=0.3)
    first = make_server_optimizer(spec, SHAPES)
    w = _arrays(rng)
    for _ in range(2):
        w = first.step(w, _arrays(rng))
    restored = make_server_optimizer(spec, SHAPES)
    restored.load_state(decode_state(encode_state(first.state())))
    assert restored.steps == first.steps == 2
    a, b = w, w
    for _ in range(3):
        d = _arrays(rng)
        a, b = first.step(a, d), restored.step(b, d)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert first.state().keys() == restored.state().keys()


def test_load_state_refuses_what_does_not_fit() -> None:
    opt = FedAdam(SHAPES, 1.0, beta1=0.9, beta2=0.99, tau=1e-3)
    good = opt.state()
    with pytest.raises(ValueError, match="missing"):
        opt.load_state({k: v for k, v in good.items() if k != "v/1"})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state({**good, "m/0": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="float64"):
        opt.load_state({**good, "m/1": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="non-negative"):
        opt.load_state({**good, "v/1": np.full(2, -1.0)})
    with pytest.raises(ValueError, match="step"):
        opt.load_state({**good, "step": np.array(-1)})
    with pytest.raises(ValueError, match="missing"):
        FedAvg(SHAPES, 1.0).load_state(good)
    assert all(np.array_equal(good[k], v) for k, v in opt.state().items())


def test_factory_and_step_validation() -> None:
    spec = AggregationSpec(algorithm=Algorithm.fedyogi, beta1=0.5, beta2=0.6, tau=0.01)
    opt = make_server_optimizer(spec, SHAPES)
    assert isinstance(opt, FedYogi) and isinstance(opt, ServerOptimizer)
    assert (opt.beta1, opt.beta2, opt.tau) == (0.5, 0.6, 0.01)
    momentum = make_server_optimizer(AggregationSpec(algorithm="fedavgm", momentum=0.5), SHAPES)
    assert isinstance(momentum, FedAvgM) and momentum.momentum == 0.5
    rng = np.random.default_rng(0)
    bad = _arrays(rng)
    bad[1][0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        opt.step(_arrays(rng), bad)
    with pytest.raises(ValueError, match="shape"):
        opt.step(_arrays(rng), [np.zeros((2, 3)), np.zeros(2)])
    assert opt.steps == 0
