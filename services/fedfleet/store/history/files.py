"""Models in a directory (a local disk, or a PersistentVolumeClaim on Kubernetes).

Each object is written to a temporary file in the job's folder, fsynced, renamed into place and
the folder fsynced, so after :meth:`FileModels.put` returns the object survives a crash and a
reader never sees half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from fedfleet.store.history.base import ModelMissing, ModelStorageError, check_name, job_path

__all__ = ["FileModels"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileModels:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_absolute():
            raise ValueError(f"model directory {root!s} must be an absolute path")

    def location(self) -> dict[str, Any]:
        return {"kind": "filesystem", "path": str(self.root)}

    def describe(self) -> str:
        return f"directory {self.root}"

    def _dir(self, job: str) -> Path:
        return self.root / job_path(job)

    def put(self, job: str, name: str, data: bytes) -> None:
        folder = self._dir(job)
        check_name(name)
        tmp = ""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, folder / name)
            tmp = ""
            _fsync_dir(folder)
        except OSError as exc:
            raise ModelStorageError(f"cannot store {job}/{name} in {self.root}: {exc}") from exc
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)

    def get(self, job: str, name: str) -> bytes:
        path = self._dir(job) / check_name(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ModelMissing(f"no {job}/{name} in {self.root}") from None
        except OSError as exc:
            raise ModelStorageError(f"cannot read {path}: {exc}") from exc

    def delete(self, job: str, name: str) -> None:
        try:
            (self._dir(job) / check_name(name)).unlink(missing_ok=True)
        except OSError as exc:
            raise ModelStorageError(f"cannot delete {job}/{name} in {self.root}: {exc}") from exc

    def names(self, job: str) -> list[str]:
        folder = self._dir(job)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))

    def delete_job(self, job: str) -> int:
        folder = self._dir(job)
        if not folder.is_dir():
            return 0
        removed = 0
        try:
            for p in folder.iterdir():
                p.unlink(missing_ok=True)
                removed += 0 if p.name.startswith(".") else 1
            folder.rmdir()
        except OSError as exc:
            raise ModelStorageError(f"cannot delete {folder}: {exc}") from exc
        return removed

    def close(self) -> None:
        pass
