"""The embedded simulator's parallel training (``EmbeddedOptions.train_workers``): devices of a
PyTorch task trained in a thread pool give the same run as one at a time — the same model
bytes, the same rounds, the same drop-outs, with or without Secure Aggregation — because each
device trains with its own generator and the simulated events keep their order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fedfleet.core.spec import FLJob, parse_manifest, with_base_dir
from fedfleet.embedded import EmbeddedOptions, run_job
from fedfleet.results import JobResult
from fedfleet.tasks import task_of

pytest.importorskip("torch")

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pytorch-cnn"


def _job(dropout: float, secure: bool = False) -> FLJob:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLE / "fljob.yaml").read_text())
    spec = doc["spec"]
    spec["task"]["config"] = {"channels": 4, "momentum": 0.5}
    spec["plan"] = {"localEpochs": 2, "batchSize": 20, "learningRate": 0.05}
    spec["rounds"] = {"total": 3, "goalCount": 6, "overSelection": 1.3, "minReportFraction": 0.5}
    spec["fleet"].update(devices=24, dropoutRate=dropout)
    if secure:
        spec["rounds"].update(goalCount=8, minReportFraction=0.75)
        spec["aggregation"] = {"secureAggregation": {"enabled": True}}
    return with_base_dir(parse_manifest(doc), str(EXAMPLE))


def _summary(result: JobResult) -> list[tuple[Any, ...]]:
    return [
        (r.round, r.selected, r.reported, r.dropped, r.model_version, r.accuracy, r.loss)
        for r in result.rounds
    ]


@pytest.mark.parametrize(("dropout", "secure"), [(0.0, False), (0.3, False), (0.2, True)])
def test_training_devices_in_threads_gives_the_same_run(dropout: float, secure: bool) -> None:
    job = _job(dropout, secure)
    assert task_of(job).task.parallel_training  # the PyTorch adapter asks for it
    alone = run_job(job, options=EmbeddedOptions(train_workers=1))
    pooled = run_job(job, options=EmbeddedOptions(train_workers=3))
    assert alone.succeeded and pooled.succeeded
    assert alone.model_version == 3
    assert _summary(pooled) == _summary(alone)
    assert pooled.model_bytes == alone.model_bytes
    if dropout:  # the drop-out path (training aborted part-way) was taken
        assert sum(r.dropped for r in alone.rounds) > 0
