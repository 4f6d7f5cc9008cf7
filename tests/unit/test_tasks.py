"""The task API: loading ``spec.task.ref``, the built-in task ``spec.model`` stands for, data
checks that name the field and shapes, and the weights file a user gets back."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedfleet.core.spec import FLJobSpec, ManifestError, TaskSpec, parse_manifest, with_base_dir
from fedfleet.tasks import TaskError, check_data, load_task, task_of
from fedfleet.tasks.builtin import BuiltinTask, evaluate, init_weights, train_local
from fedfleet.tasks.weights_file import load_weights, save_weights

pytestmark = pytest.mark.unit

GOOD = '''
import numpy as np
from fedfleet.tasks import FLTask, TrainResult

class Mean(FLTask):
    """Learns the mean of its examples' ``v`` field."""
    def __init__(self, config):
        if config.get("size", 3) < 1:
            raise ValueError("size must be positive")
        self.size = config.get("size", 3)
    def initial_weights(self):
        return {"mean": np.zeros(self.size, np.float32)}
    def train(self, weights, examples, plan, rng, should_continue):
        new = examples["v"].mean(axis=0).astype(np.float32)
        return TrainResult([new - weights[0]], len(examples["v"]), {"spread": 1.0})
    def evaluate(self, weights, examples):
        return {"loss": float(((examples["v"] - weights[0]) ** 2).mean())}

INSTANCE = Mean({})
NOT_A_TASK = 42
def float64_weights(config):
    t = Mean(config)
    t.initial_weights = lambda: {"w": np.zeros(2)}
    return t
def returns_other(config):
    return object()
'''


@pytest.fixture
def pkg(tmp_path: Path) -> str:
    """A task package in a folder that is not on the Python path."""
    folder = tmp_path / "userpkg"
    (folder / "acme_tasks_t").mkdir(parents=True)
    (folder / "acme_tasks_t" / "__init__.py").write_text("")
    (folder / "acme_tasks_t" / "mean.py").write_text(textwrap.dedent(GOOD))
    return str(folder)


def test_a_user_task_loads_by_reference_from_its_path(pkg: str) -> None:
    loaded = load_task(TaskSpec(ref="acme_tasks_t.mean:Mean", config={"size": 4}, path=pkg))
    assert loaded.names == ("mean",)
    assert loaded.shapes == [(4,)]
    assert loaded.num_parameters == 4
    assert not loaded.initial[0].flags.writeable  # version 0 is shared: read-only
    # cached per process: every actor of an embedded run shares one import
    again = load_task(TaskSpec(ref="acme_tasks_t.mean:Mean", config={"size": 4}, path=pkg))
    assert again is loaded
    instance = load_task(TaskSpec(ref="acme_tasks_t.mean:INSTANCE", path=pkg))
    assert instance.shapes == [(3,)]


@pytest.mark.parametrize(
    ("ref", "config", "match"),
    [
        (
            "acme_tasks_t.nope:Mean",
            {},
            r"^spec\.task\.ref: cannot import module 'acme_tasks_t.nope'",
        ),
        ("acme_tasks_t.mean:Missing", {}, r"^spec\.task\.ref: .* has no attribute 'Missing'"),
        ("acme_tasks_t.mean:NOT_A_TASK", {}, r"^spec\.task\.ref: .* neither a task"),
        ("acme_tasks_t.mean:Mean", {"size": 0}, r"^spec\.task\.config: .*size must be positive"),
        ("acme_tasks_t.mean:INSTANCE", {"size": 2}, r"^spec\.task\.config: .* takes no config"),
        ("acme_tasks_t.mean:float64_weights", {}, r"'w' is float64, weights must be float32"),
        ("acme_tasks_t.mean:returns_other", {}, r"returned object, not a fedfleet.tasks.FLTask"),
    ],
)
def test_a_task_that_cannot_load_names_the_field(
    pkg: str, ref: str, config: dict[str, int], match: str
) -> None:
    with pytest.raises(TaskError, match=match):
        load_task(TaskSpec(ref=ref, config=config, path=pkg))


def test_spec_model_is_shorthand_for_the_builtin_task() -> None:
    spec = FLJobSpec(
        population="p",
        model={"kind": "mlp", "inputs": 5, "classes": 3, "hidden": [4]},
        fleet={"devices": 10},
    )
    loaded = load_task(spec.effective_task)
    assert isinstance(loaded.task, BuiltinTask)
    assert loaded.names == ("dense_0.weight", "dense_0.bias", "dense_1.weight", "dense_1.bias")
    for got, want in zip(loaded.initial, init_weights(spec.model), strict=True):
        np.testing.assert_array_equal(got, want)


def test_builtin_task_trains_exactly_like_the_model_functions() -> None:
    spec = FLJobSpec(population="p", model={"inputs": 5, "classes": 3}, fleet={"devices": 10})
    rng = np.random.default_rng(0)
    x = rng.random((40, 5), dtype=np.float32)
    y = rng.integers(0, 3, 40)
    loaded = load_task(spec.effective_task)
    plan = spec.plan
    got = loaded.task.train(
        list(loaded.initial), {"x": x, "y": y}, plan, np.random.default_rng(1), lambda e: True
    )
    want = train_local(spec.model, plan, loaded.initial, x, y, np.random.default_rng(1))
    for u, w, w0 in zip(got.update, want.weights, loaded.initial, strict=True):
        np.testing.assert_array_equal(u, w - w0)
    assert got.num_examples == 40
    assert got.metrics == {"loss": want.loss, "accuracy": want.accuracy}
    loss, acc = evaluate(spec.model, want.weights, x, y)
    assert loaded.task.evaluate(want.weights, {"x": x, "y": y}) == {"loss": loss, "accuracy": acc}


def test_data_that_does_not_fit_names_the_field_and_the_shapes() -> None:
    spec = FLJobSpec(population="p", model={"inputs": 20, "classes": 3}, fleet={"devices": 10})
    loaded = load_task(spec.effective_task)
    x = np.zeros((7, 64), np.float32)
    with pytest.raises(TaskError, match=r"^spec\.fleet\.data: field 'x' .*\(64,\).*\(20,\)"):
        check_data(loaded, {"x": x, "y": np.zeros(7, np.int64)}, "spec.fleet.data")
    with pytest.raises(TaskError, match=r"field 'y' .*labels span 0\.\.5, the model has 3"):
        check_data(loaded, {"x": np.zeros((6, 20)), "y": np.arange(6)}, "spec.fleet.data")
    with pytest.raises(TaskError, match="differ in length"):
        check_data(loaded, {"x": np.zeros((6, 20)), "y": np.arange(5)}, "spec.fleet.data")
    decoded = check_data(loaded, {"x": np.zeros((6, 20)), "y": np.arange(6) % 3}, "here")
    assert set(decoded) == {"x", "y"}


def test_task_and_model_together_are_refused_and_paths_follow_the_manifest() -> None:
    doc = {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": "j"},
        "spec": {
            "population": "p",
            "task": {"ref": "a.b:c", "path": "pkg", "config": {"k": [1, 2]}},
            "fleet": {"devices": 40, "data": {"path": "data/train.csv"}},
            "evaluation": {"data": "/abs/test.csv"},
        },
    }
    job = with_base_dir(parse_manifest(doc), "/home/u/job")
    assert job.spec.task is not None and job.spec.task.path == "/home/u/job/pkg"
    assert (
        job.spec.fleet.data is not None and job.spec.fleet.data.path == "/home/u/job/data/train.csv"
    )
    assert job.spec.evaluation.data == "/abs/test.csv"
    assert job.spec.effective_task.config == {"k": [1, 2]}
    # re-written (as fedfleet up and the operator do) the job means the same
    again = parse_manifest(job.model_dump(mode="json", by_alias=True, exclude_none=True))
    assert again.spec.effective_task == job.spec.effective_task
    doc["spec"]["model"] = {"inputs": 8}  # type: ignore[index]
    with pytest.raises(ManifestError, match=r"set spec\.task or spec\.model, not both"):
        parse_manifest(doc)
    doc["spec"]["task"] = {"ref": "not a reference"}  # type: ignore[index]
    with pytest.raises(ManifestError, match=r"spec\.task\.ref"):
        parse_manifest(doc)


def test_safetensors_file_follows_the_format_and_round_trips(tmp_path: Path) -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.5], np.float32)]
    path = tmp_path / "m.safetensors"
    save_weights(path, ["layer.weight", "layer.bias"], arrays, {"job": "j"})
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert size % 8 == 0
    header = json.loads(raw[8 : 8 + size])
    assert header["__metadata__"] == {"job": "j"}
    assert header["layer.weight"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["layer.bias"] == {"dtype": "F32", "shape": [1], "data_offsets": [24, 28]}
    assert raw[8 + size :] == arrays[0].tobytes() + arrays[1].tobytes()
    got = load_weights(path)
    assert list(got) == ["layer.weight", "layer.bias"]
    for g, a in zip(got.values(), arrays, strict=True):
        np.testing.assert_array_equal(g, a)
    with pytest.raises(ValueError, match="unknown weights format"):
        save_weights(tmp_path / "m.pt", ["a"], arrays[:1], {})
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(tmp_path / "bad.safetensors")


def test_task_of_a_job_is_its_effective_task() -> None:
    job = parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "j"},
            "spec": {"population": "p", "fleet": {"devices": 40}},
        }
    )
    assert task_of(job).shapes == [(64, 10), (10,)]
