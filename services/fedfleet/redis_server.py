"""The one launcher of a private ``redis-server``: ``fedfleet up``, benchmarks and tests alike.

Redis holds every committed checkpoint of a job, so wherever fedfleet starts it, it is
durable by default: an append-only file fsynced on every write (``appendfsync always``; the
write that commits a model returns only once it is on disk), RDB snapshots off, in the
server's own folder. Killing the process (SIGKILL) and starting it again on the same folder
and port loses no acknowledged write. ``durable=False`` persists nothing — a Redis that
comes back empty, which the chaos tests use to show that fencing tokens and attempt numbers
never go backwards even then.

Each server gets a loopback port, a config file (so the password stays out of ``ps``), a
unix socket and a log in its folder; ``start()`` after ``stop()`` reuses all of them.
"""

from __future__ import annotations

import secrets
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on ``host``; a random password unless one is given."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        password: str | None = None,
        durable: bool = True,
        startup_timeout: float = 10.0,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "redis-server is not on PATH; run `bash deploy/dev.sh setup` to install it"
            )
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self.password = password if password is not None else secrets.token_hex(16)
        self.durable = durable
        self._own_dir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="fedfleet-redis-")) if workdir is None else workdir
        )
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

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The server process while it runs (for CPU pinning in benchmarks)."""
        return self._proc

    @property
    def exit_status(self) -> int | None:
        """The status the server exited with, None while it runs (or was never started)."""
        return None if self._proc is None else self._proc.poll()

    def client(self) -> redis.Redis:
        """A plain client, for tests that inspect keys directly."""
        return redis.Redis(
            host=self.host, port=self.port, password=self.password or None, socket_timeout=2.0
        )

    def _write_config(self) -> Path:
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            "protected-mode yes",
            'save ""',
            "daemonize no",
            f"dir {self.workdir}",
            f"unixsocket {self.workdir / 'redis.sock'}",
            "unixsocketperm 700",
            f"logfile {self.workdir / 'redis.log'}",
        ]
        if self.durable:
            lines += ["appendonly yes", "appendfsync always", "aof-use-rdb-preamble yes"]
        else:
            lines += ["appendonly no"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf = self.workdir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        return conf

    def start(self) -> None:
        """Start the server (again, on the same port, folder and data) and wait for PING."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
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
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass  # not listening yet, or still loading its append-only file
                if time.monotonic() > deadline:
                    self.stop(kill=True)
                    raise RedisServerError(
                        f"redis-server did not answer PING on {self.host}:{self.port} "
                        f"within {self.startup_timeout}s: {self._diagnostics()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, *, kill: bool = False) -> None:
        """End the server: SIGTERM (a clean shutdown), or SIGKILL with ``kill`` (a crash)."""
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
