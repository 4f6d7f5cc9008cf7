"""examples/pytorch-cnn: a PyTorch CNN on MNIST-5k, non-IID (two label shards per device), run
embedded from its manifest through the PyTorch adapter, reaches test accuracy >= 0.85, and the
weights it writes load back into the ``nn.Module``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fedfleet.cli import main
from fedfleet.device.datasets import prepare
from fedfleet.tasks.weights_file import load_weights

torch = pytest.importorskip("torch")
from fedfleet.core.spec import load_manifest  # noqa: E402
from fedfleet.tasks.torch import to_state_dict  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pytorch-cnn"


def test_pytorch_cnn_example_reaches_085_and_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "cnn.safetensors"
    report = tmp_path / "report.json"
    manifest = EXAMPLE / "fljob.yaml"
    assert main(["run", str(manifest), "--out", str(out), "--report", str(report), "--quiet"]) == 0
    totals = json.loads(report.read_text())["totals"]
    assert totals["succeeded"] and totals["final_accuracy"] >= 0.85, totals
    # the user's own module, loaded from the file, scores what the server measured
    sys.path.insert(0, str(EXAMPLE))
    from mnist_cnn.task import Net

    model = Net(16)
    model.load_state_dict(to_state_dict(load_weights(out)))
    model.eval()
    test = prepare(load_manifest(manifest.read_text()).spec.fleet).test
    assert test is not None
    with torch.no_grad():
        images = torch.from_numpy(np.array(test["x"], np.float32).reshape(-1, 1, 28, 28))
        predicted = model(images).argmax(dim=1).numpy()
    assert np.mean(predicted == test["y"]) == pytest.approx(totals["final_accuracy"], abs=1e-9)
