"""A real ``redis-server`` on a free loopback port, for the contract, integration and chaos tiers.

Tests run against the same Redis a deployment uses, not a fake: each server gets its own port,
working directory and config file (the password stays out of ``ps``), persists nothing, and
can be stopped and started again on the same port to play a Redis restart.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

__all__ = ["RedisServer", "RedisServerError", "free_port"]


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not come up."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process; ``start()`` after ``stop()`` reuses the port and password.

    Nothing is persisted (``save ""``, no AOF), so a restart comes back empty, as a Redis
    without persistence does.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        password: str | None = None,
        workdir: Path | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "redis-server is not on PATH; run `bash deploy/dev.sh setup` to install it"
            )
        self.binary = binary
        self.password = password
        self.port = free_port()
        self._own_dir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="fedfleet-redis-")) if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        query = f"?password={self.password}" if self.password else ""
        return f"unix://{self.workdir / 'redis.sock'}{query}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> redis.Redis:
        """A plain client, for tests that inspect keys directly."""
        return redis.Redis(
            host=self.host, port=self.port, password=self.password, socket_timeout=2.0
        )

    def _write_config(self) -> Path:
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            "protected-mode yes",
            'save ""',
            "appendonly no",
            "daemonize no",
            f"dir {self.workdir}",
            f"unixsocket {self.workdir / 'redis.sock'}",
            "unixsocketperm 700",
            f"logfile {self.workdir / 'redis.log'}",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf = self.workdir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        return conf

    def start(self) -> None:
        if self.running:
            return
        conf = self._write_config()
        with open(self.workdir / "stderr.log", "ab") as stderr:  # config errors land here
            self._proc = subprocess.Popen(
                [self.binary, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + self.startup_timeout
        client = self.client()
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RedisServerError(f"redis-server exited: {self._diagnostics()}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(
                        f"redis-server did not answer PING on {self.host}:{self.port} "
                        f"within {self.startup_timeout}s: {self._diagnostics()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, *, kill: bool = True) -> None:
        """End the server: SIGKILL (a crash) by default, SIGTERM for a clean shutdown."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _diagnostics(self) -> str:
        tail: list[str] = []
        for name in ("stderr.log", "redis.log"):
            log = self.workdir / name
            if log.exists():
                tail += log.read_text(errors="replace").splitlines()[-5:]
        return " | ".join(tail) or f"no log in {self.workdir}"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None and self.running else None
        return f"RedisServer({self.host}:{self.port}, pid={pid})"
