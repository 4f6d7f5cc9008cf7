"""Unit tests of the built-in numpy task (fedfleet.tasks.builtin) and fedfleet.core.models'
weight arithmetic: shapes, backprop, local training, FedProx."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.core.models import TrainingAborted, apply_delta, delta
from fedfleet.core.spec import ModelKind, ModelSpec, PlanSpec
from fedfleet.tasks.builtin import (
    TrainResult,
    evaluate,
    init_weights,
    loss_and_grads,
    train_local,
    weight_shapes,
)

pytestmark = pytest.mark.unit

SOFTMAX = ModelSpec(kind=ModelKind.softmax, inputs=5, classes=3)
MLP = ModelSpec(kind=ModelKind.mlp, inputs=5, classes=3, hidden=[4, 3])


def _blobs(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three separable clusters in [0, 1]^5."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    centers = np.array([[0.1] * 5, [0.5] * 5, [0.9] * 5])
    x = centers[y] + rng.uniform(-0.08, 0.08, size=(n, 5))
    return x.astype(np.float32), y.astype(np.int64)


def test_shapes_and_dtypes() -> None:
    assert weight_shapes(SOFTMAX) == [(5, 3), (3,)]
    assert weight_shapes(MLP) == [(5, 4), (4,), (4, 3), (3,), (3, 3), (3,)]
    for spec in (SOFTMAX, MLP):
        weights = init_weights(spec)
        assert [w.shape for w in weights] == weight_shapes(spec)
        assert all(w.dtype == np.float32 for w in weights)
    assert all(not w.any() for w in init_weights(SOFTMAX))


def test_init_is_deterministic_per_seed() -> None:
    a, b = init_weights(MLP), init_weights(MLP)
    c = init_weights(MLP.model_copy(update={"init_seed": 1}))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    assert np.abs(a[0]).max() > 0 and not a[1].any()


@pytest.mark.parametrize("spec", [SOFTMAX, MLP], ids=["softmax", "mlp"])
def test_gradients_match_finite_differences(spec: ModelSpec) -> None:
    rng = np.random.default_rng(3)
    weights = [rng.normal(0, 0.7, size=s) for s in weight_shapes(spec)]
    x = rng.uniform(0, 1, size=(7, spec.inputs))
    y = rng.integers(0, spec.classes, size=7)
    _, grads = loss_and_grads(spec, weights, x, y)
    eps = 1e-6
    for k, w in enumerate(weights):
        numeric = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            orig = w[idx]
            w[idx] = orig + eps
            plus, _ = loss_and_grads(spec, weights, x, y)
            w[idx] = orig - eps
            minus, _ = loss_and_grads(spec, weights, x, y)
            w[idx] = orig
            numeric[idx] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grads[k], numeric, rtol=1e-5, atol=1e-8, err_msg=f"array {k}")


@pytest.mark.parametrize("spec", [SOFTMAX, MLP], ids=["softmax", "mlp"])
def test_local_training_reduces_loss(spec: ModelSpec) -> None:
    x, y = _blobs()
    weights = init_weights(spec)
    before, _ = evaluate(spec, weights, x, y)
    plan = PlanSpec(local_epochs=30, batch_size=8, learning_rate=0.2)
    result = train_local(spec, plan, weights, x, y, np.random.default_rng(0))
    assert isinstance(result, TrainResult)
    after, accuracy = evaluate(spec, result.weights, x, y)
    assert after < 0.5 * before
    assert accuracy == 1.0
    assert result.num_examples == 60
    assert 0 < result.loss < before and result.accuracy > 0.9
    assert all(w.dtype == np.float32 for w in result.weights)


def test_training_is_deterministic_given_rng() -> None:
    x, y = _blobs()
    plan = PlanSpec(local_epochs=2, batch_size=7, learning_rate=0.3)
    a = train_local(MLP, plan, init_weights(MLP), x, y, np.random.default_rng(5))
    b = train_local(MLP, plan, init_weights(MLP), x, y, np.random.default_rng(5))
    assert all(np.array_equal(p, q) for p, q in zip(a.weights, b.weights, strict=True))
    assert a.loss == b.loss


def test_inputs_are_not_mutated() -> None:
    x, y = _blobs()
    weights = init_weights(MLP)
    saved = [w.copy() for w in weights]
    x_saved, y_saved = x.copy(), y.copy()
    plan = PlanSpec(local_epochs=3, batch_size=5, learning_rate=0.5, proximal_mu=0.1)
    result = train_local(MLP, plan, weights, x, y, np.random.default_rng(0))
    assert all(np.array_equal(w, s) for w, s in zip(weights, saved, strict=True))
    assert np.array_equal(x, x_saved) and np.array_equal(y, y_saved)
    assert not any(r is w for r, w in zip(result.weights, weights, strict=True))
    assert not np.array_equal(result.weights[0], saved[0])


def test_fedprox_pulls_towards_global() -> None:
    x, y = _blobs()
    weights = init_weights(MLP)

    def drift(mu: float) -> float:
        plan = PlanSpec(local_epochs=10, batch_size=10, learning_rate=0.5, proximal_mu=mu)
        result = train_local(MLP, plan, weights, x, y, np.random.default_rng(0))
        return float(sum(np.sum(d.astype(np.float64) ** 2) for d in delta(result.weights, weights)))

    free, prox = drift(0.0), drift(1.0)
    assert free > 0 and prox < 0.5 * free


def test_evaluate_is_numerically_stable() -> None:
    x, y = _blobs(n=10)
    weights = [np.full((5, 3), 1e4, dtype=np.float32), np.zeros(3, dtype=np.float32)]
    weights[0][:, 0] = -1e4
    loss, accuracy = evaluate(SOFTMAX, weights, x, y)
    assert np.isfinite(loss) and loss > 100
    assert 0.0 <= accuracy <= 1.0


def test_delta_and_apply_delta_round_trip() -> None:
    rng = np.random.default_rng(0)
    old = [rng.standard_normal(s).astype(np.float32) for s in weight_shapes(MLP)]
    new = [rng.standard_normal(s).astype(np.float32) for s in weight_shapes(MLP)]
    d = delta(new, old)
    back = apply_delta(old, d)
    for a, b in zip(back, new, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-6)
    halfway = apply_delta(old, d, scale=0.5)
    np.testing.assert_allclose(halfway[0], (old[0] + new[0]) / 2, atol=1e-6)


def test_rejects_mismatched_inputs() -> None:
    x, y = _blobs(n=10)
    plan = PlanSpec()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="weight arrays"):
        train_local(SOFTMAX, plan, init_weights(MLP), x, y, rng)
    with pytest.raises(ValueError, match="shape"):
        evaluate(SOFTMAX, [np.zeros((5, 4), np.float32), np.zeros(3, np.float32)], x, y)
    with pytest.raises(ValueError, match="labels"):
        evaluate(SOFTMAX, init_weights(SOFTMAX), x, y + 3)
    with pytest.raises(ValueError, match="x must have shape"):
        evaluate(SOFTMAX, init_weights(SOFTMAX), x[:, :4], y)
    with pytest.raises(ValueError, match="no examples"):
        train_local(SOFTMAX, plan, init_weights(SOFTMAX), x[:0], y[:0], rng)


def test_should_continue_is_asked_before_every_epoch() -> None:
    x, y = _blobs()
    plan = PlanSpec(local_epochs=3, batch_size=10, learning_rate=0.1)
    asked: list[int] = []

    def until_second(epoch: int) -> bool:
        asked.append(epoch)
        return epoch < 1

    with pytest.raises(TrainingAborted):
        train_local(
            SOFTMAX,
            plan,
            init_weights(SOFTMAX),
            x,
            y,
            np.random.default_rng(0),
            should_continue=until_second,
        )
    assert asked == [0, 1]
    asked.clear()
    train_local(
        SOFTMAX,
        plan,
        init_weights(SOFTMAX),
        x,
        y,
        np.random.default_rng(0),
        should_continue=lambda e: asked.append(e) is None,
    )
    assert asked == [0, 1, 2]
