"""The adaptive server optimizers train with their default server learning rate."""

from __future__ import annotations

import pytest

from fedfleet.core.spec import ADAPTIVE_SERVER_LEARNING_RATE, parse_manifest
from fedfleet.embedded import run_job

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_train_with_their_default_learning_rate(algorithm: str) -> None:
    job = parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": f"default-{algorithm}"},
            "spec": {
                "population": "defaults",
                "rounds": {"total": 15, "goalCount": 10},
                "aggregation": {"algorithm": algorithm},  # no serverLearningRate
                "fleet": {"devices": 100, "dataset": "digits", "seed": 3},
            },
        }
    )
    assert job.spec.aggregation.server_learning_rate is None
    assert job.spec.aggregation.server_lr == ADAPTIVE_SERVER_LEARNING_RATE
    result = run_job(job)
    assert result.succeeded
    # 1.0, the old default, diverged to 0.08 (chance is 0.1).
    assert result.final_accuracy is not None and result.final_accuracy > 0.7
