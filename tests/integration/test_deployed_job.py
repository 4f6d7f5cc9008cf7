"""The deployed shape end to end: redis-server, coordinator + standby, 2 selectors,
2 aggregators as real uvicorn processes, and a simulated fleet over real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfleet.core.spec import load_manifest
from tests.integration.deployed import run_deployed, small_job

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def test_digits_example_through_http_and_redis_reaches_088() -> None:
    job = load_manifest((EXAMPLES / "digits.yaml").read_text())
    out = run_deployed(job, timeout=600)
    assert out.finished
    committed = [a for a in out.attempts if not a["abandoned"]]
    assert len(committed) == 50
    assert out.result.model_version == 50
    # Real time is not deterministic, and on pathological non-IID data the last round's
    # accuracy swings several points between rounds: the job must reach 0.88 (the issue's
    # criterion) and its final model must not have collapsed.
    accuracies = [a["metrics"]["accuracy"] for a in committed]
    assert max(accuracies) >= 0.88, accuracies[-10:]
    assert out.result.final_accuracy is not None and out.result.final_accuracy >= 0.80
    # A round closes at K reports, or earlier once every selected device has reported or
    # dropped out (at least the minimum): never more than K, never fewer than the minimum.
    minimum = job.spec.rounds.minimum_count
    assert all(minimum <= a["reported"] <= job.spec.rounds.goal_count for a in committed)


def test_small_job_versions_are_consecutive() -> None:
    out = run_deployed(small_job(), timeout=180)
    assert out.finished
    committed = [a for a in out.attempts if not a["abandoned"]]
    assert [a["model_version"] for a in committed] == list(range(1, 13))
    assert out.versions_seen == sorted(out.versions_seen)
