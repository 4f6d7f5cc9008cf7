"""The hostile devices of issue 12 §1, as adversaries of an embedded job.

Each attacker holds valid credentials: it is one of the fleet's own devices, selected and
ticketed like any other, and rewrites only what it reports (its example count and its update).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedfleet.core.models import Weights
from fedfleet.core.protocol import ReportEnvelope
from fedfleet.core.serde import encode_arrays
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.results import RoundRecord

__all__ = ["HUGE", "Attacker", "digits_job"]

HUGE = np.float32(3e38)
"""Finite, a hair below float32's largest value."""


def digits_job(name: str, **robustness: Any) -> FLJob:
    """The README's digits job (0.91 accuracy after 50 rounds), with robustness overrides."""
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": name},
            "spec": {
                "population": "digits-demo",
                "model": {"kind": "softmax", "inputs": 64, "classes": 10},
                "plan": {"localEpochs": 5, "batchSize": 10, "learningRate": 0.1},
                "rounds": {"total": 50, "goalCount": 20, "overSelection": 1.3},
                "aggregation": {"robustness": robustness},
                "fleet": {"devices": 200, "dataset": "digits", "shardsPerDevice": 2, "seed": 0},
            },
        }
    )


class Attacker:
    """Devices ``dev-000000`` .. ``dev-{n-1}`` turn hostile once ``after`` versions are committed.

    ``kind``: ``"examples"`` claims 1,000,000 examples and reports ``-2 x model`` (with that
    weight the average flips the model's sign: accuracy near 0); ``"huge"`` reports every
    coordinate at 3e38 (finite) with its true example count.
    """

    def __init__(self, kind: str, *, devices: int = 1, after: int = 20) -> None:
        if kind not in ("examples", "huge"):
            raise ValueError(kind)
        self.kind = kind
        self.devices = {f"dev-{i:06d}" for i in range(devices)}
        self.after = after
        self.sent = 0
        self.version = 0
        self.accuracies: list[float] = []
        """Accuracy of every committed round, in order."""

    def __call__(self, env: ReportEnvelope, model: Weights) -> ReportEnvelope:
        if env.device_id not in self.devices or self.version < self.after:
            return env
        self.sent += 1
        if self.kind == "examples":
            update = [(-2.0 * w).astype(np.float32) for w in model]
            return dataclasses.replace(env, num_examples=1_000_000, update=encode_arrays(update))
        update = [np.full(w.shape, HUGE, dtype=np.float32) for w in model]
        return dataclasses.replace(env, update=encode_arrays(update))

    # ProgressSink: the attacker watches the job's progress to strike once it has trained.
    def round_started(self, round_: int, selected: int) -> None:
        pass

    def round_ended(self, record: RoundRecord) -> None:
        self.version = max(self.version, record.model_version)
        if not record.abandoned and record.accuracy is not None:
            self.accuracies.append(record.accuracy)
