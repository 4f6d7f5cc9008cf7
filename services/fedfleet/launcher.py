"""Start a local deployment's actor processes from one pre-imported process (a fork server).

Every actor of ``fedfleet up`` is its own process, as every actor of a cluster is its own pod.
Each used to start a fresh interpreter and import FastAPI, uvicorn, pydantic, Redis, numpy and
fedfleet: about a CPU-second per process, six or seven of them per deployment, which on a
2-core machine was a quarter of a short job's wall time (``bench/up.py``). The launcher
imports all of that once, then forks a child per actor: the child runs the same command line
(``fedfleet.cli.main(argv)``) with its output appended to the actor's log, so an actor is the
same program as before, only started from memory already loaded.

The protocol between the deployment and its launcher is JSON lines over the launcher's stdin and
stdout, nothing else (no pickle): ``{"argv", "log", "cwd", "env"}`` asks for a process, the
answer is ``{"pid"}`` (or ``{"error"}``); ``{"exit": pid, "status": code}`` reports a child that
ended (a negative status is the signal that killed it, as in :mod:`subprocess`). The launcher
reaps its children itself; :class:`LaunchedProcess` gives the deployment the part of
:class:`subprocess.Popen`'s interface it uses. When its stdin closes (the deployment is gone),
the launcher stops its remaining children with SIGTERM and exits.

The launcher forks only from its one thread, before any child has started a loop or a thread,
and each child re-seeds numpy's and Python's global random state.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["LaunchedProcess", "Launcher"]

PRELOAD = (
    "fedfleet.cli",
    "fedfleet.service.commands",
    "fedfleet.service.server",
    "fedfleet.selector.app",
    "fedfleet.aggregator.app",
    "fedfleet.coordinator.app",
    "fedfleet.gateway.app",
    "fedfleet.store.redis",
    "uvicorn",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.lifespan.on",
    "pydantic.v1",  # FastAPI asks for it while it builds each route's models
    "anyio._backends._asyncio",  # on the first sync endpoint's run in the thread pool
    "uvloop",  # uvicorn's event loop, when installed
    "httpx",
    "httpcore",  # on a selector's first httpx.Client
    "certifi",
    "encodings.idna",
    "yaml",
    "numpy.ma",
    "fedfleet.core.manifest_yaml",
    "fedfleet.tasks.builtin",
    "fedfleet.device.datasets",
)
"""What every actor imports anyway (a module that fails to import is left to the child);
the launcher also builds the command-line parser once, which imports each command's module."""


class LaunchedProcess:
    """A child of the launcher, as much of :class:`subprocess.Popen` as a deployment uses."""

    def __init__(self, pid: int, args: list[str], launcher: Launcher) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._launcher = launcher
        self._ended = threading.Event()

    def _exited(self, status: int) -> None:
        self.returncode = status
        self._ended.set()

    def poll(self) -> int | None:
        if self.returncode is None and not self._launcher.alive:
            status = self._launcher.orphan_status(self.pid)
            if status is not None:
                self._exited(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self._ended.wait(0.2 if left is None else min(0.2, left))
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass  # it ended; the launcher's report is on its way

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """The deployment's side: start the launcher process, ask it for actor processes."""

    def __init__(
        self, python: str, env: dict[str, str], cwd: Path, log_path: Path, timeout: float = 60.0
    ) -> None:
        self._log = log_path.open("ab")
        self._proc = subprocess.Popen(
            [python, "-P", "-m", "fedfleet.launcher"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=cwd,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[bytes] = self._proc.stdin
        self._children: dict[int, LaunchedProcess] = {}
        self._early: dict[int, int] = {}
        """Exits reported before the spawn's answer was handled (a child that died at once)."""
        self._answers: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._write = threading.Lock()
        self._reader = threading.Thread(
            target=self._read, args=(self._proc.stdout,), name="launcher-reader", daemon=True
        )
        self._reader.start()
        try:
            self._take(timeout, "ready")
        except BaseException:
            self.close(timeout=5.0)
            raise

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def orphan_status(self, pid: int) -> int | None:
        """A child whose launcher is gone and did not report its end: ``None`` while the
        process still runs, else -SIGKILL (its real status went with the launcher)."""
        with self._cond:
            if pid in self._early:
                return self._early.pop(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return -signal.SIGKILL
        return None

    def spawn(
        self, argv: list[str], log: Path, cwd: Path, env: dict[str, str], timeout: float = 30.0
    ) -> LaunchedProcess:
        """One actor: ``fedfleet.cli.main(argv)`` in a child, its output appended to ``log``."""
        line = json.dumps({"argv": argv, "log": str(log), "cwd": str(cwd), "env": env})
        with self._write:
            try:
                self._stdin.write(line.encode() + b"\n")
                self._stdin.flush()
            except OSError as exc:
                raise RuntimeError(f"the launcher is gone: {exc}") from None
            answer = self._take(timeout, "pid")
        if "pid" not in answer:
            raise RuntimeError(f"the launcher could not start {argv[:2]}: {answer.get('error')}")
        pid = int(answer["pid"])
        child = LaunchedProcess(pid, ["fedfleet", *argv], self)
        with self._cond:
            self._children[pid] = child
            if pid in self._early:
                child._exited(self._early.pop(pid))
        return child

    def _take(self, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or (not self.alive and not self._reader.is_alive()):
                    raise RuntimeError(f"no {what} from the launcher (see its log)")
                self._cond.wait(min(left, 0.5))
            return self._answers.pop(0)

    def _read(self, out: IO[bytes]) -> None:
        for raw in out:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                if "exit" in msg:
                    pid, status = int(msg["exit"]), int(msg["status"])
                    child = self._children.pop(pid, None)
                    if child is None:
                        self._early[pid] = status
                    else:
                        child._exited(status)
                else:
                    self._answers.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def close(self, timeout: float = 15.0) -> None:
        """Close the launcher (its remaining children are sent SIGTERM) and wait for it."""
        try:
            self._stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(5)
        self._log.close()


# -- the launcher process ------------------------------------------------------------------------
def _child(request: dict[str, Any]) -> int:
    """In the forked child: become the actor."""
    # The signal dispositions of a freshly started interpreter (the launcher ignores SIGINT:
    # a Ctrl-C reaches the actors, in the same process group, and the deployment stops them).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import random

    import numpy as np

    random.seed()
    np.random.seed(int.from_bytes(os.urandom(4), "little"))
    from fedfleet.cli import main

    argv = [str(a) for a in request["argv"]]
    sys.argv = ["fedfleet", *argv]
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def _serve() -> None:
    import atexit
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the child will import it again and say what is wrong
            print(f"launcher: could not preload {name}: {exc!r}", file=sys.stderr, flush=True)
    try:
        from fedfleet.cli import build_parser

        build_parser()
    except Exception as exc:
        print(f"launcher: could not build the parser: {exc!r}", file=sys.stderr, flush=True)
    out = sys.stdout.buffer
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    children: set[int] = set()

    def say(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg).encode() + b"\n")
        out.flush()

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            children.discard(pid)
            say({"exit": pid, "status": os.waitstatus_to_exitcode(status)})

    say({"ready": True})
    pending = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.05)
        reap()
        if not ready:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            raw, pending = pending.split(b"\n", 1)
            try:
                request = json.loads(raw)
                pid = os.fork()
            except (ValueError, OSError) as exc:
                say({"error": repr(exc)})
                continue
            if pid == 0:
                code = 1
                try:
                    code = _child(request)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    atexit._run_exitfuncs()  # what the interpreter runs at a normal exit
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code if isinstance(code, int) else 1)
            children.add(pid)
            say({"pid": pid})
    for pid in list(children):  # the deployment is gone: do not leave its actors running
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10.0
    while children and time.monotonic() < deadline:
        reap()
        time.sleep(0.05)
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while children:
        reap()
        time.sleep(0.05)


if __name__ == "__main__":
    _serve()
