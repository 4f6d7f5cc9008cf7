"""``fedfleet report`` for a job that ran with no one watching: read back from a real Redis.

A job runs to the end in the deployed shape (actors as processes, a fleet over HTTP) against
the session's password-protected redis-server, as it would on a cluster; afterwards
``fedfleet report --store URL --job KEY`` must write the same JSON report (same fields, a row
per attempt, totals that match the store) and the PNG plot ``fedfleet run`` writes locally.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import fields
from pathlib import Path

import pytest

from fedfleet.cli import main
from fedfleet.results import JobResult, RoundRecord
from tests.integration.deployed import small_job
from tests.integration.live_job import live_job
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(900)  # bounds a hang on a loaded machine; not a performance check
def test_report_of_a_finished_job_from_the_store(
    redis_server: RedisServer, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = small_job(f"report-{secrets.token_hex(3)}", rounds={"total": 4})
    with live_job(job, redis_url) as d:
        deadline = time.monotonic() + 600  # bounds a hang; the job takes seconds when idle
        while d.store.job_state(job.key).get("phase") != "Succeeded":
            assert time.monotonic() < deadline, d.store.job_state(job.key)
            time.sleep(0.2)
        attempts = [a for a in d.store.attempts(job.key) if a["reason"] != "job-finished"]
        history = d.store.metrics(job.key)

    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["report", "--store", redis_url, "--job", job.key, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    report_path, plot_path = out / f"{job.name}.json", out / f"{job.name}.png"
    assert f"wrote report {report_path}" in printed.out
    assert redis_server.password and redis_server.password not in printed.out + printed.err

    report = json.loads(report_path.read_text())
    local_shape = JobResult(job="x").to_report()  # what `fedfleet run` writes, field for field
    assert report.keys() == local_shape.keys()
    assert report["totals"].keys() == local_shape["totals"].keys()
    assert all(row.keys() == {f.name for f in fields(RoundRecord)} for row in report["rounds"])
    assert len(report["rounds"]) == len(attempts)
    assert [r["model_version"] for r in report["rounds"] if not r["abandoned"]] == [1, 2, 3, 4]
    assert [r["accuracy"] for r in report["rounds"] if not r["abandoned"]] == [
        m["accuracy"] for m in history
    ]
    totals = report["totals"]
    assert (totals["rounds"], totals["model_version"]) == (4, 4)
    assert (totals["succeeded"], totals["reason"]) == (True, "rounds")
    assert totals["final_accuracy"] == history[-1]["accuracy"]
    assert totals["wall_seconds"] > 0
    assert plot_path.read_bytes()[:8] == PNG and plot_path.stat().st_size > 10_000


def test_report_refusals(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["report", "--store", redis_url, "--out", str(tmp_path)]
    assert main([*args, "--job", "team-a/never-ran"]) == 1
    assert "no job 'team-a/never-ran'" in capsys.readouterr().err
    assert main([*args, "--job", "a{b}"]) == 2
    assert main(["report", "--store", "http://x", "--job", "a/b"]) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written for any of them
