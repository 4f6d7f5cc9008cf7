"""The Keras 3 adapter against real Keras on the JAX backend (the ``keras`` extra): model.weights
in a fixed order as float32 named by path, local training with the model's own train step,
abort, FedProx, evaluation, data checks, threads, and loading a saved model back."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from fedfleet.core.models import TrainingAborted
from fedfleet.core.spec import PlanSpec
from fedfleet.tasks import DataMismatch
from fedfleet.tasks.weights_file import load_weights, save_weights

pytest.importorskip("jax")
keras = pytest.importorskip("fedfleet.tasks.keras").keras
from fedfleet.tasks.keras import KerasTask, load_into  # noqa: E402

pytestmark = pytest.mark.unit

PLAN = PlanSpec(local_epochs=3, batch_size=8, learning_rate=0.1)


def _net() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(3),
        ]
    )


def _task(seed: int = 0) -> KerasTask:
    return KerasTask(_net, keras.losses.SparseCategoricalCrossentropy(from_logits=True), seed=seed)


def _data(n: int = 90, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, 4)).astype(np.float32)
    x[np.arange(n), y] += 2.0  # separable
    return {"x": x, "y": y}


def _train(task: KerasTask, start: list[np.ndarray], data: dict[str, np.ndarray], **kw: object):
    plan = PlanSpec(**{"local_epochs": 3, "batch_size": 8, "learning_rate": 0.1, **kw})
    return task.train(start, data, plan, np.random.default_rng(0), lambda epoch: True)


def test_the_backend_is_jax_unless_chosen() -> None:
    # jax when KERAS_BACKEND was unset (the adapter sets it before importing keras)
    assert keras.backend.backend() == os.environ["KERAS_BACKEND"]


def test_weights_are_model_weights_in_order_as_float32_named_by_path_and_seeded() -> None:
    task = _task()
    weights = task.initial_weights()
    model = _net()  # built after the task's: its layers are named dense_2..., not dense
    assert [w.shape for w in weights.values()] == [tuple(v.shape) for v in model.weights]
    assert list(weights) == [v.path for v in task.model.weights]
    assert list(weights)[:2] == ["sequential/dense/kernel", "sequential/dense/bias"]
    assert "sequential/batch_normalization/moving_variance" in weights  # non-trainable state
    assert all(w.dtype == np.float32 for w in weights.values())
    # the same names and values in any process: a fresh session, a fixed seed
    again, other = _task().initial_weights(), _task(seed=1).initial_weights()
    assert list(again) == list(weights)
    np.testing.assert_array_equal(
        weights["sequential/dense/kernel"], again["sequential/dense/kernel"]
    )
    assert not np.array_equal(weights["sequential/dense/kernel"], other["sequential/dense/kernel"])


def test_training_lowers_the_loss_and_reports_new_minus_old() -> None:
    task = _task()
    start = list(task.initial_weights().values())
    data = task.decode(_data())
    assert data["inputs"].dtype == np.float32 and data["labels"].dtype == np.int32
    before = task.evaluate(start, data)
    result = _train(task, start, data)
    assert result.num_examples == 90
    assert [u.shape for u in result.update] == [w.shape for w in start]
    assert all(u.dtype == np.float32 for u in result.update)
    assert all(np.abs(u).max() > 0 for u in result.update)  # every weight moved, stats included
    new = [w + u for w, u in zip(start, result.update, strict=True)]
    after = task.evaluate(new, data)
    assert after["loss"] < before["loss"] / 2
    assert after["accuracy"] >= 0.9
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.metrics["loss"] > 0
    # deterministic given the rng (the optimizer starts afresh), global weights untouched
    again = _train(task, start, data)
    for a, b in zip(result.update, again.update, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(start[0], _task().initial_weights()["sequential/dense/kernel"])


def test_the_optimizer_starts_afresh_every_round() -> None:
    task = KerasTask(
        _net,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        lambda plan: keras.optimizers.SGD(plan.learning_rate, momentum=0.9),
    )
    start = list(task.initial_weights().values())
    data = task.decode(_data())
    first = _train(task, start, data)
    _train(task, start, task.decode(_data(seed=5)))  # another device, another momentum
    again = _train(task, start, data)
    for a, b in zip(first.update, again.update, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_proximal_term_keeps_weights_near_the_global_model() -> None:
    task = _task()
    start = list(task.initial_weights().values())
    data = task.decode(_data())
    free = _train(task, start, data)
    held = _train(task, start, data, proximal_mu=5.0)
    norm = lambda u: sum(float(np.sum(x**2)) for x in u)  # noqa: E731
    assert norm(held.update) < norm(free.update)


def test_losing_eligibility_aborts_training() -> None:
    task = _task()
    with pytest.raises(TrainingAborted):
        task.train(
            list(task.initial_weights().values()),
            task.decode(_data()),
            PLAN,
            np.random.default_rng(0),
            lambda epoch: epoch < 1,
        )


def test_data_that_does_not_fit_the_model_names_the_field() -> None:
    task = _task()
    with pytest.raises(DataMismatch, match=r"shape \(5,\) do not fit the model") as info:
        task.check_data(task.decode({"x": np.zeros((4, 5), np.float32), "y": np.zeros(4)}))
    assert info.value.field == "x"
    with pytest.raises(DataMismatch, match=r"labels span 0\.\.7, the model outputs 3") as info:
        task.check_data(task.decode({"x": np.zeros((8, 4), np.float32), "y": np.arange(8)}))
    assert info.value.field == "y"
    task.check_data(task.decode(_data()))


def test_a_model_without_weights_is_refused_and_input_shape_builds_it() -> None:
    def unbuilt() -> keras.Model:
        return keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match="no weights yet"):
        KerasTask(unbuilt, loss)
    task = KerasTask(unbuilt, loss, input_shape=(2, 2))
    assert [w.shape for w in task.initial_weights().values()] == [(4, 3), (3,)]
    assert task.decode({"x": np.zeros((5, 4)), "y": np.zeros(5)})["inputs"].shape == (5, 2, 2)


def test_devices_may_train_in_threads_at_once() -> None:
    task = _task()
    start = list(task.initial_weights().values())
    datasets = [task.decode(_data(seed=s)) for s in range(3)]
    alone = [_train(task, start, d).update for d in datasets]
    together: list[list[np.ndarray] | None] = [None] * 3

    def run(i: int) -> None:
        together[i] = _train(task, start, datasets[i]).update

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(alone, together, strict=True):
        assert got is not None
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_saved_model_loads_back_into_a_fresh_model(tmp_path: Path) -> None:
    task = _task()
    start = list(task.initial_weights().values())
    data = task.decode(_data())
    update = _train(task, start, data).update
    trained = [w + u for w, u in zip(start, update, strict=True)]
    path = tmp_path / "model.safetensors"
    save_weights(path, list(task.initial_weights()), trained, {})
    model = load_into(_net(), load_weights(path))
    predicted = np.asarray(model.predict_on_batch(data["inputs"])).argmax(axis=1)
    assert np.mean(predicted == data["labels"]) == pytest.approx(
        task.evaluate(trained, data)["accuracy"]
    )
    with pytest.raises(ValueError, match="do not fit the model"):
        load_into(_net(), dict(list(load_weights(path).items())[:-1]))
