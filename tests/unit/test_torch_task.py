"""The PyTorch adapter against real PyTorch (the ``torch`` extra): state_dict weights in a fixed
order as float32, local training, abort, data checks, threads, and loading a saved model back."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from fedfleet.core.models import TrainingAborted
from fedfleet.core.spec import PlanSpec
from fedfleet.tasks import DataMismatch
from fedfleet.tasks.weights_file import load_weights, save_weights

torch = pytest.importorskip("torch")
from fedfleet.tasks.torch import TorchTask, to_state_dict  # noqa: E402

pytestmark = pytest.mark.unit

PLAN = PlanSpec(local_epochs=3, batch_size=8, learning_rate=0.1)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


def _task(seed: int = 0) -> TorchTask:
    return TorchTask(_net, torch.nn.CrossEntropyLoss(), seed=seed)


def _data(n: int = 90, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, 4)).astype(np.float32)
    x[np.arange(n), y] += 2.0  # separable
    return {"x": x, "y": y}


def test_weights_are_the_state_dict_in_order_as_float32_and_seeded() -> None:
    weights = _task().initial_weights()
    assert list(weights) == list(_net().state_dict())
    assert "1.num_batches_tracked" in weights and "1.running_mean" in weights
    assert all(w.dtype == np.float32 for w in weights.values())
    again, other = _task().initial_weights(), _task(seed=1).initial_weights()
    np.testing.assert_array_equal(weights["0.weight"], again["0.weight"])
    assert not np.array_equal(weights["0.weight"], other["0.weight"])


def test_training_lowers_the_loss_and_reports_new_minus_old() -> None:
    task = _task()
    start = list(task.initial_weights().values())
    data = task.decode(_data())
    before = task.evaluate(start, data)
    result = task.train(start, data, PLAN, np.random.default_rng(0), lambda epoch: True)
    assert result.num_examples == 90
    assert [u.shape for u in result.update] == [w.shape for w in start]
    assert all(u.dtype == np.float32 for u in result.update)
    new = [w + u for w, u in zip(start, result.update, strict=True)]
    after = task.evaluate(new, data)
    assert after["loss"] < before["loss"] / 2
    assert after["accuracy"] >= 0.9
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.metrics["loss"] > 0
    # batch norm's counter is state too: it advanced by the steps taken (3 epochs x 12 batches)
    assert new[list(task.initial_weights()).index("1.num_batches_tracked")] == 36
    # deterministic given the rng, and the global weights were not touched
    again = task.train(start, data, PLAN, np.random.default_rng(0), lambda epoch: True)
    for a, b in zip(result.update, again.update, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(start[0], _task().initial_weights()["0.weight"])


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


def test_data_that_does_not_fit_the_module_names_the_field() -> None:
    task = _task()
    with pytest.raises(DataMismatch, match=r"shape \(5,\) do not fit the model") as info:
        task.check_data(task.decode({"x": np.zeros((4, 5), np.float32), "y": np.zeros(4)}))
    assert info.value.field == "x"
    with pytest.raises(DataMismatch, match=r"labels span 0\.\.7, the model outputs 3"):
        task.check_data(task.decode({"x": np.zeros((8, 4), np.float32), "y": np.arange(8)}))


def test_devices_may_train_in_threads_at_once() -> None:
    task = _task()
    start = list(task.initial_weights().values())
    datasets = [task.decode(_data(seed=s)) for s in range(4)]
    alone = [
        task.train(start, d, PLAN, np.random.default_rng(i), lambda e: True).update
        for i, d in enumerate(datasets)
    ]
    together: list[list[np.ndarray] | None] = [None] * 4

    def run(i: int) -> None:
        together[i] = task.train(
            start, datasets[i], PLAN, np.random.default_rng(i), lambda e: True
        ).update

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(alone, together, strict=True):
        assert got is not None
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_saved_model_loads_back_into_the_module(tmp_path: Path) -> None:
    task = _task()
    start = list(task.initial_weights().values())
    data = task.decode(_data())
    update = task.train(start, data, PLAN, np.random.default_rng(0), lambda e: True).update
    trained = [w + u for w, u in zip(start, update, strict=True)]
    path = tmp_path / "model.safetensors"
    save_weights(path, list(task.initial_weights()), trained, {})
    model = _net()
    model.load_state_dict(to_state_dict(load_weights(path)))
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(data["inputs"])).argmax(dim=1).numpy()
    assert np.mean(predicted == data["labels"]) == pytest.approx(
        task.evaluate(trained, data)["accuracy"]
    )
    assert model.state_dict()["1.num_batches_tracked"].dtype == torch.int64
