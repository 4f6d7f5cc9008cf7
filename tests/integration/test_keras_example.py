"""examples/keras-mlp: a Keras 3 MLP (JAX backend) on scikit-learn's digits, non-IID (two label
shards per device), run embedded from its manifest through the Keras adapter, reaches test
accuracy >= 0.85, and the weights it writes load back into the user's ``keras.Model``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfleet.cli import main
from fedfleet.device.datasets import prepare
from fedfleet.tasks.weights_file import load_weights

pytest.importorskip("jax")
pytest.importorskip("fedfleet.tasks.keras")
from fedfleet.core.spec import load_manifest
from fedfleet.tasks.keras import load_into

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "keras-mlp"


def test_keras_mlp_example_reaches_085_and_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "mlp.safetensors"
    report = tmp_path / "report.json"
    manifest = EXAMPLE / "fljob.yaml"
    assert main(["run", str(manifest), "--out", str(out), "--report", str(report), "--quiet"]) == 0
    totals = json.loads(report.read_text())["totals"]
    assert totals["succeeded"] and totals["final_accuracy"] >= 0.85, totals
    # the user's own model, loaded from the file, scores what the server measured
    sys.path.insert(0, str(EXAMPLE))
    from digits_mlp.task import make_model

    weights = load_weights(out)
    assert list(weights) == [
        "digits_mlp/dense/kernel",
        "digits_mlp/dense/bias",
        "digits_mlp/dense_1/kernel",
        "digits_mlp/dense_1/bias",
    ]
    model = load_into(make_model(64), weights)
    test = prepare(load_manifest(manifest.read_text()).spec.fleet).test
    assert test is not None
    predicted = np.asarray(model.predict(np.asarray(test["x"], np.float32), verbose=0))
    accuracy = np.mean(predicted.argmax(axis=1) == test["y"])
    assert accuracy == pytest.approx(totals["final_accuracy"], abs=1e-6)
