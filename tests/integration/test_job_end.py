"""The job's last round is recorded as committed however its commit and the job's end race.

The master aggregator commits while the coordinator's tick is between advancing the rounds and
checking whether the job is done. The coordinator then finishes the job with the last round
still `closing`; it must record that round as the commit it was, not as abandoned. (A loaded
machine hit this window in the deployed shape: committed versions 1..5 of a 6-round job.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedfleet.coordinator.actor import Coordinator
from fedfleet.core.protocol import Phase, RoundState
from fedfleet.core.spec import load_manifest, parse_manifest
from fedfleet.embedded import run_job

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def test_a_commit_landing_between_advance_and_done_is_recorded_as_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = load_manifest((EXAMPLES / "digits.yaml").read_text()).model_dump(
        by_alias=True, mode="json"
    )
    doc["spec"]["rounds"]["total"] = 1
    job = parse_manifest(doc)
    real_advance = Coordinator._advance

    def advance_before_the_commit(self: Coordinator, r: RoundState, now: float) -> None:
        # Every tick sees the closing round before the master's commit lands, so the commit is
        # only noticed by the job-done check that follows in the same tick.
        if r.phase is not Phase.closing:
            real_advance(self, r, now)

    monkeypatch.setattr(Coordinator, "_advance", advance_before_the_commit)
    result = run_job(job)
    assert result.succeeded and result.model_version == 1
    committed = [r for r in result.rounds if not r.abandoned]
    assert [r.model_version for r in committed] == [1]
    assert committed[0].accuracy is not None
    reasons: list[Any] = [r.reason for r in result.rounds if r.abandoned]
    assert "job-finished" not in reasons
