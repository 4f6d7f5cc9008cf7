"""The fork server local deployments start their actors from (``fedfleet.launcher``).

Real processes: a launcher started with the venv's interpreter, children running the real
``fedfleet`` command line. What a deployment relies on: a child's output goes to its log, its
exit status (or the signal that killed it) comes back as :class:`subprocess.Popen` would give
it, it runs with the environment and directory it was given, and closing the launcher leaves
no child running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfleet.launcher import Launcher
from fedfleet.local import actor_environment

pytestmark = pytest.mark.integration


def _launcher(tmp_path: Path) -> Launcher:
    return Launcher(sys.executable, actor_environment(), tmp_path, tmp_path / "launcher.log")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0: read its state.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_children_run_the_command_line_with_their_log_env_and_status(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path)
    try:
        env = {**actor_environment(), "FEDFLEET_LAUNCHER_TEST": "seen"}
        ok = launcher.spawn(["--version"], tmp_path / "version.log", tmp_path, env)
        assert ok.wait(30) == 0
        assert "fedfleet" in (tmp_path / "version.log").read_text()
        bad = launcher.spawn(["no-such-command"], tmp_path / "bad.log", tmp_path, env)
        assert bad.wait(30) == 2  # argparse's usage error, as from a fresh interpreter
        assert "invalid choice" in (tmp_path / "bad.log").read_text()
        # A long-running child: a real actor, killed by a signal the deployment sends.
        manifest = tmp_path / "job.yaml"
        manifest.write_text("not: a manifest\n")
        refused = launcher.spawn(
            ["validate", str(manifest)], tmp_path / "validate.log", tmp_path, env
        )
        assert refused.wait(30) == 2
        assert "kind" in (tmp_path / "validate.log").read_text()
    finally:
        launcher.close()


def test_a_killed_child_reports_its_signal_and_closing_stops_the_rest(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path)
    try:
        # A coordinator whose store is unreachable serves its health and retries: it runs
        # until it is told to stop.
        manifest = Path(__file__).resolve().parents[2] / "examples" / "custom-numpy" / "fljob.yaml"
        secret = tmp_path / "secret"
        secret.write_text("ab" * 32)
        args = ["coordinator", "--manifest", str(manifest), "--secret-file", str(secret)]
        args += ["--store", "redis://127.0.0.1:1/0", "--host", "127.0.0.1", "--port", "0"]
        first = launcher.spawn([*args, "--id", "c-0"], tmp_path / "c0.log", tmp_path, {})
        second = launcher.spawn([*args, "--id", "c-1"], tmp_path / "c1.log", tmp_path, {})
        with pytest.raises(subprocess.TimeoutExpired):
            first.wait(1.0)
        assert second.poll() is None
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        assert not _alive(first.pid)
        helped = launcher.spawn(["simulate", "--help"], tmp_path / "help.log", tmp_path, {})
        assert helped.wait(30) == 0  # the launcher still serves after a child was killed
        assert second.poll() is None
    finally:
        launcher.close()
    deadline = time.monotonic() + 15
    while _alive(second.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(second.pid), "closing the launcher left a child running"
