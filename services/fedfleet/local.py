"""The deployed shape on one machine: redis-server and every actor as its own process.

``fedfleet up`` and the integration and chaos tests use :class:`LocalDeployment`: a durable
Redis server (:mod:`fedfleet.redis_server`, unless a store URL is given), two coordinators
(active and standby), selectors and aggregators, each a real uvicorn process on its own
loopback address (127.0.0.2, 127.0.0.3, …) and a free port. Processes can be killed one by
one, which is how the chaos tests crash actors mid-round. With a population secret and a
``gateway_address`` it also runs the population's gateway (``fedfleet population gateway``) on
that address: the one endpoint devices know, in front of the job's selectors.

Actors run ``python -P -m fedfleet.cli`` in the deployment's own folder: ``-P`` keeps the
working directory off ``sys.path``, so a folder named ``fedfleet`` where the user happens to
stand cannot shadow the package. The folder (with the actors' logs) is deleted when the
deployment stops, unless an actor failed: then the logs stay and
:attr:`LocalDeployment.failures` says where they are.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx
import yaml

from fedfleet.core.spec import FLJob
from fedfleet.launcher import LaunchedProcess, Launcher
from fedfleet.redis_server import RedisServer, free_port
from fedfleet.service.keys import JobKeys
from fedfleet.store.base import Store
from fedfleet.store.factory import open_store

__all__ = [
    "ActorFailed",
    "ActorProcess",
    "LocalDeployment",
    "RedisProcess",
    "actor_environment",
    "free_port",
    "manifest_yaml",
]


class ActorFailed(RuntimeError):
    """An actor process exited while it was expected to serve; the message holds its log's
    path and last lines."""


def manifest_yaml(job: FLJob) -> str:
    return yaml.safe_dump(
        job.model_dump(by_alias=True, mode="json", exclude_none=True), sort_keys=False
    )


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_http(
    url: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | LaunchedProcess | None = None,
    log_path: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            where = "" if log_path is None else f"; its log is {log_path}:\n{_tail(log_path)}"
            raise ActorFailed(f"{url}: process exited with status {proc.returncode}{where}")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s ({last})")


def actor_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment an actor process starts with: the caller's, unbuffered, safe path.

    With ``PYTHONDONTWRITEBYTECODE`` set (and no ``PYTHONPYCACHEPREFIX``), every actor would
    compile each module it imports from source at every start — about two CPU-seconds per
    process, a dozen for a deployment. The actors instead keep their bytecode under
    ``${FEDFLEET_CACHE:-~/.cache/fedfleet}/pycache`` (outside the source tree and the virtual
    environment, which stay as clean as the setting asked for), so later starts load it.
    """
    env = dict(os.environ if environ is None else environ)
    env.update(PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")
    if env.get("PYTHONDONTWRITEBYTECODE") and not env.get("PYTHONPYCACHEPREFIX"):
        cache = env.get("FEDFLEET_CACHE") or str(Path.home() / ".cache" / "fedfleet")
        env.pop("PYTHONDONTWRITEBYTECODE")
        env["PYTHONPYCACHEPREFIX"] = str(Path(cache) / "pycache")
    return env


RedisProcess = RedisServer
"""The launcher's former name here (benchmarks use it)."""


@dataclass
class ActorProcess:
    role: str
    actor_id: str
    host: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | LaunchedProcess | None = None
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalDeployment:
    """Start a job's actors as processes; stop (or kill) them; read the job's store."""

    def __init__(
        self,
        job: FLJob,
        *,
        store_url: str | None = None,
        workdir: Path | None = None,
        selectors: int = 2,
        aggregators: int = 2,
        coordinators: int = 2,
        tick_seconds: float = 0.2,
        lease_ttl: float = 3.0,
        python: str = sys.executable,
        population_secret: bytes | None = None,
        gateway_address: tuple[str, int] | None = None,
        fork_server: bool = True,
    ) -> None:
        """``gateway_address`` (with ``population_secret``) runs the population's gateway
        there: the endpoint devices keep across jobs; the actors take loopback addresses of
        their own. ``fork_server`` starts the actors from one pre-imported process
        (:mod:`fedfleet.launcher`) instead of a fresh interpreter each."""
        if gateway_address is not None and population_secret is None:
            raise ValueError("a gateway needs the population secret")
        self.job = job
        self.gateway_address = gateway_address
        self._own_workdir = workdir is None
        self.workdir = (workdir or Path(tempfile.mkdtemp(prefix=f"fedfleet-{job.name}-"))).resolve()
        self.redis: RedisServer | None = None
        self.store_url = store_url or ""
        self.counts = {
            "coordinator": coordinators,
            "aggregator": aggregators,
            "selector": selectors,
        }
        self.tick_seconds = tick_seconds
        self.lease_ttl = lease_ttl
        self.python = python
        self.secret = secrets.token_bytes(32)
        self.keys = JobKeys.from_secret(self.secret)
        self.population_secret = population_secret
        """With it, selectors enroll devices of the job's population (``population-secret``)."""
        self.actors: dict[str, ActorProcess] = {}
        self._store: Store | None = None
        self._next_host = 2
        self._killed: set[int] = set()
        """Pids this deployment killed on purpose: their exit is not a failure."""
        self.fork_server = fork_server
        self._launcher: Launcher | None = None
        self.failures: list[tuple[str, int, Path]] = []
        """Actors that exited on their own with a non-zero status: id, status, log path (the
        logs are kept when the deployment stops)."""

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.store_url:
            self.redis = RedisServer(self.workdir / "redis")
            self.redis.start()
            self.store_url = self.redis.url
        self.manifest_path = self.workdir / "fljob.yaml"
        self.manifest_path.write_text(manifest_yaml(self.job))
        self.secret_path = self.workdir / "job-secret"
        self.secret_path.write_text(self.secret.hex())
        self.secret_path.chmod(0o600)
        if self.population_secret is not None:
            population = self.workdir / "population-secret"
            population.touch(0o600)
            population.write_text(self.population_secret.hex())
        if self.fork_server:
            try:
                self._launcher = Launcher(
                    self.python, actor_environment(), self.workdir, self.workdir / "launcher.log"
                )
            except RuntimeError:
                self._launcher = None  # each actor starts its own interpreter, and says why not
        for role in ("coordinator", "aggregator", "selector"):
            for i in range(self.counts[role]):
                self.spawn(role, f"{role}-{i}")
        if self.gateway_address is not None:
            self.spawn("gateway", "gateway")
        for actor in self.actors.values():
            path = "/healthz" if actor.role == "coordinator" else "/readyz"
            _wait_http(actor.url + path, timeout, actor.proc, actor.log_path)

    def spawn(self, role: str, actor_id: str) -> ActorProcess:
        """Start (or restart, on the same address) one actor process."""
        old = self.actors.get(actor_id)
        if old is not None:
            host, port = old.host, old.port
        elif role == "gateway" and self.gateway_address is not None:
            host, port = self.gateway_address
        else:
            host = f"127.0.0.{self._next_host}"
            self._next_host += 1
            port = free_port(host)
        actor = ActorProcess(role, actor_id, host, port, self.workdir / f"{actor_id}.log")
        env = actor_environment()
        argv = (
            self._gateway_command(host, port)
            if role == "gateway"
            else self._actor_command(role, actor_id, host, port)
        )
        if self._launcher is not None and self._launcher.alive:
            actor.proc = self._launcher.spawn(argv, actor.log_path, self.workdir, env)
        else:
            actor.log = actor.log_path.open("ab")
            actor.proc = subprocess.Popen(
                [self.python, "-P", "-m", "fedfleet.cli", *argv],
                stdout=actor.log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        self.actors[actor_id] = actor
        return actor

    def _gateway_command(self, host: str, port: int) -> list[str]:
        """The gateway's ``fedfleet`` arguments."""
        return [
            "population",
            "gateway",
            "--population",
            self.job.spec.population,
            "--population-secret-file",
            str(self.workdir / "population-secret"),
            "--store",
            self.store_url,
            "--host",
            host,
            "--port",
            str(port),
            "--tick",
            str(self.tick_seconds),
            "--id",
            "gateway",
        ]

    def _actor_command(self, role: str, actor_id: str, host: str, port: int) -> list[str]:
        """An actor's ``fedfleet`` arguments."""
        return [
            role,
            "--manifest",
            str(self.manifest_path),
            "--store",
            self.store_url,
            "--secret-file",
            str(self.secret_path),
            "--id",
            actor_id,
            "--host",
            host,
            "--port",
            str(port),
            "--tick",
            str(self.tick_seconds),
            "--lease-ttl",
            str(self.lease_ttl),
            *(
                ["--population-secret-file", str(self.workdir / "population-secret")]
                if role == "selector" and self.population_secret is not None
                else []
            ),
        ]

    def kill(self, actor_id: str, sig: int = signal.SIGKILL) -> None:
        actor = self.actors[actor_id]
        if actor.proc is not None and actor.proc.poll() is None:
            self._killed.add(actor.proc.pid)
            actor.proc.send_signal(sig)
            actor.proc.wait(15)

    def stop(self) -> None:
        for actor in self.actors.values():
            status = None if actor.proc is None else actor.proc.poll()
            if actor.proc is not None and status is not None and status != 0:
                if actor.proc.pid not in self._killed:
                    self.failures.append((actor.actor_id, status, actor.log_path))
        for actor in self.actors.values():
            if actor.alive and actor.proc is not None:
                actor.proc.send_signal(signal.SIGTERM)
        for actor in self.actors.values():
            if actor.proc is not None:
                try:
                    actor.proc.wait(15)
                except subprocess.TimeoutExpired:
                    actor.proc.kill()
                    actor.proc.wait()
            if actor.log is not None:
                actor.log.close()
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self.redis is not None:
            self.redis.stop()
        if self._own_workdir and not self.failures:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self._own_workdir:
            # Keep the logs for the user to read, not the job's secret.
            for secret in ("job-secret", "population-secret"):
                with contextlib.suppress(OSError):
                    (self.workdir / secret).unlink()

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- views ------------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.store_url)
        return self._store

    def urls(self, role: str) -> list[str]:
        return [a.url for a in self.actors.values() if a.role == role and a.alive]

    def log_tail(self, actor_id: str, lines: int = 30) -> str:
        text = self.actors[actor_id].log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
