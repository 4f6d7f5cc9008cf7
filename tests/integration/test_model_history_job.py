"""Whole jobs that keep a model history: embedded on a directory, and the deployed shape (real
uvicorn actors, redis-server, HTTP fleet) on a real S3-compatible server (versitygw).

The master aggregator commits every model through its backend, selectors hand devices models
they read back from it, and ``fedfleet fetch-model`` gets the best one out as safetensors.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfleet.cli import main
from fedfleet.core.checkpoint import unpack_checkpoint
from fedfleet.embedded import run_job
from fedfleet.local import LocalDeployment
from fedfleet.store.history import read_index
from fedfleet.store.history.base import ModelRef, version_of
from fedfleet.store.history.files import FileModels
from fedfleet.tasks import task_of
from fedfleet.tasks.weights_file import load_weights
from tests.integration.deployed import Fault, run_deployed, small_job, version_reached
from tests.integration.test_embedded_job import _job
from tests.s3_server import S3Server

pytestmark = pytest.mark.integration


def _best(metrics: list[dict[str, Any]]) -> int:
    """The version with the highest accuracy, the newer on a tie."""
    best = max(metrics, key=lambda m: (m["accuracy"], m["model_version"]))
    return int(best["model_version"])


def _fetch(tmp_path: Path, job: str, version: str, *source: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"{version}.safetensors"
    assert main(["fetch-model", "--job", job, "--version", version, "-o", str(out), *source]) == 0
    return load_weights(out)


def test_embedded_job_keeps_the_newest_three_and_the_best_in_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "models"
    storage = {"kind": "filesystem", "path": str(root)}
    job = _job(checkpoints={"keep": 3, "storage": storage})
    result = run_job(job)
    assert result.succeeded and result.model_version == 10

    models = FileModels(root)
    index = read_index(models, job.key)
    assert index is not None
    accuracies = {r.model_version: r.accuracy for r in result.rounds if not r.abandoned}
    best = max(accuracies, key=lambda v: (accuracies[v], v))
    assert result.best_model is not None and result.best_model["version"] == best
    assert result.to_report()["totals"]["best_model"]["version"] == best
    stored = sorted(v for n in models.names(job.key) if (v := version_of(n)) is not None)
    assert stored == sorted({8, 9, 10, best})
    assert (root / "_" / "t" / "index.json").is_file()  # a job without a namespace: _/<name>

    shapes = task_of(job).shapes
    fetched = _fetch(tmp_path, job.key, "best", "--storage", f"file://{root}")
    best_object = next(e["object"] for e in index["models"] if e["version"] == best)
    expected, _ = unpack_checkpoint(models.get(job.key, best_object), shapes)
    assert np.array_equal(fetched["w.0"], expected[0]) and np.array_equal(
        fetched["w.1"], expected[1]
    )
    latest = _fetch(tmp_path, job.key, "latest", "--storage", f"file://{root}")
    final, _ = unpack_checkpoint(result.model_bytes, shapes)
    assert np.array_equal(latest["w.0"], final[0])


def test_deployed_job_commits_every_model_to_s3_and_trains_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with S3Server(tmp_path / "s3") as s3:
        # the actors inherit the credentials from the environment, as pods get them from a Secret
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.credentials[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.credentials[1])
        prefix = f"it-{secrets.token_hex(4)}"
        storage = {
            "kind": "s3",
            "bucket": s3.bucket,
            "prefix": prefix,
            "endpoint": s3.endpoint,
        }
        job = small_job(checkpoints={"keep": 2, "storage": storage})
        pointers: list[bytes] = []

        def read_pointer(d: LocalDeployment) -> None:
            checkpoint = d.store.checkpoint(job.key)
            assert checkpoint is not None
            pointers.append(checkpoint.data)

        out = run_deployed(job, timeout=240, faults=[Fault(version_reached(6), read_pointer)])
        assert out.finished
        committed = [a for a in out.attempts if not a["abandoned"]]
        assert [a["model_version"] for a in committed] == list(range(1, 13))

        with s3.models(prefix=prefix) as models:
            index = read_index(models, job.key)
            assert index is not None
            best = _best([a["metrics"] for a in committed])
            assert index["best"]["version"] == best
            stored = sorted(v for n in models.names(job.key) if (v := version_of(n)) is not None)
            assert stored == sorted({11, 12, best})
            best_object = index["best"]["object"]
            expected, _ = unpack_checkpoint(models.get(job.key, best_object), task_of(job).shapes)
        # Redis held a reference to the model in S3, not the model
        assert len(pointers) == 1 and ModelRef.is_ref(pointers[0]) and len(pointers[0]) < 1000

        url = f"s3://{s3.bucket}/{prefix}?endpoint={s3.endpoint}"
        fetched = _fetch(tmp_path, job.key, "best", "--storage", url)
        assert np.array_equal(fetched["w.0"], expected[0])
