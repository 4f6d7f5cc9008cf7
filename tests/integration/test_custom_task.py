"""A task that is not built in (examples/custom-numpy: federated linear regression in plain
numpy, on the user's CSV split by its natural id column) runs from its manifest embedded and
through the deployed shape (``fedfleet up``: redis-server, uvicorn actors, HTTP fleet), with
server-side evaluation on the named held-out file, federated evaluation and device metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedfleet.cli import main
from fedfleet.tasks.weights_file import load_weights

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom-numpy"
MANIFEST = EXAMPLE / "fljob.yaml"
DEVICE_METRICS = {"train_loss", "train_r2", "federated_loss", "federated_r2"}


def _check_report(report: dict[str, Any], weights_file: Path) -> None:
    committed = [r for r in report["rounds"] if not r["abandoned"]]
    assert len(committed) == 15
    totals = report["totals"]
    assert totals["succeeded"]
    # server-side evaluation on data/test.csv with the task's own metrics
    assert totals["metrics"]["r2"] >= 0.9, totals["metrics"]
    assert committed[-1]["loss"] < committed[0]["loss"] / 5
    for row in committed:
        assert set(row["device_metrics"]) == DEVICE_METRICS
    # devices evaluate the global model they receive: round 1's is all zeros (r2 < 0)
    assert committed[0]["device_metrics"]["federated_r2"] < 0.5
    assert committed[-1]["device_metrics"]["federated_r2"] >= 0.8
    weights = load_weights(weights_file)
    assert list(weights) == ["weight", "bias"]
    assert weights["weight"].shape == (8,) and weights["weight"].dtype == np.float32


def test_custom_numpy_example_runs_embedded(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    out = tmp_path / "model.safetensors"
    code = main(["run", str(MANIFEST), "--out", str(out), "--report", str(report), "--quiet"])
    assert code == 0
    _check_report(json.loads(report.read_text()), out)


def test_custom_numpy_example_runs_under_fedfleet_up(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "fedfleet.cli", "up", str(MANIFEST), "--out", str(tmp_path)]
    cmd += ["--report", str(report), "--quiet", "--timeout", "400"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_report(json.loads(report.read_text()), tmp_path / "custom-numpy.safetensors")


def test_a_task_and_data_that_do_not_fit_are_refused_before_work_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = MANIFEST.read_text().replace("features: 8", "features: 5")
    text = text.replace("path: .", f"path: {EXAMPLE}").replace("data/", f"{EXAMPLE}/data/")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    for command in ("validate", "up", "run"):
        assert (
            main([command, str(bad), "--quiet"] if command != "validate" else [command, str(bad)])
            == 2
        )
        err = capsys.readouterr().err
        assert err.startswith("error: spec.fleet.data: field 'x'"), err
        assert "(8,)" in err and "(5,)" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    missing = tmp_path / "missing.yaml"
    missing.write_text(text.replace("linreg.task:LinearRegression", "linreg.nothere:Task"))
    assert main(["validate", str(missing)]) == 2
    assert "spec.task.ref: cannot import module 'linreg.nothere'" in capsys.readouterr().err


def test_the_same_job_from_parquet_files_trains_exactly_as_from_csv(tmp_path: Path) -> None:
    """Parquet (the `parquet` extra: pyarrow) end to end: the example's CSV files written as
    Parquet by pyarrow, the manifest pointed at them, and the job's every round equal to the
    CSV job's (same rows, same columns, same seed)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    for name in ("train", "test"):
        table = pacsv.read_csv(EXAMPLE / "data" / f"{name}.csv")
        assert isinstance(table, pa.Table) and table.num_rows > 0
        pq.write_table(table, tmp_path / f"{name}.parquet")
    text = MANIFEST.read_text().replace("path: .", f"path: {EXAMPLE}")
    text = text.replace("data/train.csv", "train.parquet").replace("data/test.csv", "test.parquet")
    manifest = tmp_path / "fljob.yaml"
    manifest.write_text(text)
    reports = {}
    for kind, path in (("csv", MANIFEST), ("parquet", manifest)):
        report = tmp_path / f"{kind}.json"
        out = tmp_path / f"{kind}.safetensors"
        code = main(["run", str(path), "--out", str(out), "--report", str(report), "--quiet"])
        assert code == 0
        reports[kind] = json.loads(report.read_text())
        _check_report(reports[kind], out)
    rounds = {
        k: [(r["loss"], r["device_metrics"]) for r in v["rounds"]] for k, v in reports.items()
    }
    assert rounds["parquet"] == rounds["csv"]
    assert reports["parquet"]["totals"]["metrics"] == reports["csv"]["totals"]["metrics"]


def test_the_task_image_layout_imports_a_task_without_task_path(tmp_path: Path) -> None:
    """As in the image: the build context on PYTHONPATH, the manifest without `task.path`,
    the working directory elsewhere; the actors' loader finds the task and its data."""
    doc = yaml.safe_load((EXAMPLE / "fljob.yaml").read_text())
    del doc["spec"]["task"]["path"]
    doc["spec"]["evaluation"]["data"] = str(EXAMPLE / "data" / "test.csv")  # /opt/... in the image
    manifest = tmp_path / "fljob.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    script = (
        "import sys; from pathlib import Path\n"
        "from fedfleet.core.spec import load_manifest\n"
        "from fedfleet.aggregator.app import dataset_evaluator\n"
        "from fedfleet.tasks import task_of\n"
        "job = load_manifest(Path(sys.argv[1]).read_text())\n"
        "print(task_of(job).names, sorted(dataset_evaluator(job)(list(task_of(job).initial))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(manifest)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "('weight', 'bias') ['loss', 'r2']"
    # Without the context on the path the same manifest is refused, naming the field.
    env.pop("PYTHONPATH")
    done = subprocess.run(
        [sys.executable, "-c", script, str(manifest)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "spec.task.ref: cannot import module 'linreg.task'" in (
        done.stderr
    )
