"""A real S3-compatible server (versitygw, posix backend) on a free loopback port.

The binary is built before pytest by ``deploy/build-s3-server.sh`` (``bash deploy/dev.sh
setup``), which writes ``<cache>/bin/s3-server.env``; a test never builds anything. A missing
build fails the test that needs it with the command that makes it.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from pathlib import Path
from types import TracebackType

from fedfleet.redis_server import free_port
from fedfleet.store.history.base import ModelStorageError
from fedfleet.store.history.s3 import S3Models

__all__ = ["S3Server", "S3ServerMissing", "versitygw_path"]

BUILD_HINT = "build it first: bash deploy/dev.sh setup (or bash deploy/build-s3-server.sh)"


class S3ServerMissing(RuntimeError):
    """versitygw was not built (or not where its env file says)."""


def versitygw_path() -> Path:
    cache = os.environ.get("FEDFLEET_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedfleet"
    )
    env_file = Path(cache) / "bin" / "s3-server.env"
    if not env_file.is_file():
        raise S3ServerMissing(f"no S3 server build at {env_file}; {BUILD_HINT}")
    m = re.search(r"^export FEDFLEET_VERSITYGW=(.+)$", env_file.read_text(), re.MULTILINE)
    binary = Path(m[1]) if m else Path()
    if not m or not os.access(binary, os.X_OK):
        raise S3ServerMissing(f"{env_file} names no executable versitygw; {BUILD_HINT}")
    return binary


class S3Server:
    """``with S3Server(tmp_path) as s3:`` — ``s3.endpoint``, ``s3.credentials``, ``s3.models()``."""

    def __init__(self, workdir: Path, *, bucket: str = "models") -> None:
        self.binary = versitygw_path()
        self.workdir = workdir
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.credentials = (f"ak{secrets.token_hex(6)}", secrets.token_hex(20), None)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> S3Server:
        data, meta = self.workdir / "s3-data", self.workdir / "s3-meta"
        data.mkdir(parents=True, exist_ok=True)
        meta.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "ROOT_ACCESS_KEY_ID": self.credentials[0],
            "ROOT_SECRET_ACCESS_KEY": self.credentials[1],
        }
        self._log = (self.workdir / "versitygw.log").open("wb")
        self._proc = subprocess.Popen(
            [
                str(self.binary),
                "--port",
                f"127.0.0.1:{self.port}",
                "--quiet",
                "posix",
                "--sidecar",
                str(meta),
                str(data),
            ],
            env=env,  # credentials through the environment: not visible in ps
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"versitygw exited {self._proc.returncode}; see {self._log.name}"
                )
            try:
                with self.models() as models:
                    models.create_bucket()
                return self
            except ModelStorageError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def models(self, *, prefix: str = "fedfleet") -> S3Models:
        return _Closing(
            self.bucket, prefix=prefix, endpoint=self.endpoint, credentials=self.credentials
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._log.close()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _Closing(S3Models):
    def __enter__(self) -> S3Models:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
