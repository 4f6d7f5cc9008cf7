"""What an unlucky operator runs into: a hostile working directory, an actor that dies at
start, a reader that closes the pipe. Each ends in a clear message, never a traceback."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.local import ActorFailed, LocalDeployment
from tests.hostile.harness import hostile_job
from tests.redis_server import RedisServer

pytestmark = pytest.mark.hostile

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_actors_start_from_a_folder_that_shadows_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    if not redis_server.running:
        redis_server.start()
    shadow = tmp_path / "fedfleet"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('imported the wrong fedfleet')\n")
    (shadow / "cli.py").write_text("raise SystemExit('imported the wrong fedfleet')\n")
    monkeypatch.chdir(tmp_path)
    job = hostile_job(f"shadow-{secrets.token_hex(3)}")
    deployment = LocalDeployment(
        job,
        store_url=redis_server.url,
        workdir=Path("deployment"),  # relative to the hostile folder, on purpose
        selectors=1,
        aggregators=1,
        coordinators=1,
    )
    try:
        with deployment:
            assert all(actor.alive for actor in deployment.actors.values())
            assert len(deployment.urls("selector")) == 1
        assert deployment.failures == []
    finally:
        deployment.store.delete_job(job.key)
        deployment.store.close()


def test_a_failed_actor_keeps_its_log_and_says_where(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    if not redis_server.running:
        redis_server.start()
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'boom: the actor could not start' >&2\nexit 3\n")
    broken.chmod(0o755)
    job = hostile_job(f"broken-{secrets.token_hex(3)}")
    deployment = LocalDeployment(
        job,
        store_url=redis_server.url,
        python=str(broken),
        selectors=1,
        aggregators=1,
        coordinators=1,
    )
    with pytest.raises(ActorFailed) as failed:
        with deployment:
            pass
    message = str(failed.value)
    assert "status 3" in message and "boom: the actor could not start" in message
    assert deployment.failures
    for _, status, log in deployment.failures:
        assert status == 3
        assert log.exists() and "boom" in log.read_text()
        assert str(log) in message or log.name in message or len(deployment.failures) > 1
    assert not (deployment.workdir / "job-secret").exists()  # the logs stay, the secret not


def test_a_closed_pipe_ends_quietly() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedfleet.cli",
            "validate",
            str(ROOT / "deploy/examples/digits.yaml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    status = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err == ""
    assert status in (0, 1)
