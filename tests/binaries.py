"""Where the tests find the cluster binaries (etcd, kube-apiserver and friends, kubectl, helm).

They are built by ``deploy/build-binaries.sh`` in the setup step of ``bash deploy/dev.sh test``,
before pytest starts; a test never builds anything under its timeout. dev.sh exports
``FEDFLEET_BINARIES`` (the build's ``env.sh``); without it the default cache location is read.
A missing or stale build fails the test that needs it with the command that makes it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["BinariesMissing", "env_sh_path", "read_binaries_env"]


class BinariesMissing(RuntimeError):
    """The cluster binaries were not built (or not where env.sh says)."""


def env_sh_path() -> Path:
    if explicit := os.environ.get("FEDFLEET_BINARIES"):
        return Path(explicit)
    cache = os.environ.get("FEDFLEET_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedfleet"
    )
    return Path(cache) / "bin" / "env.sh"


def read_binaries_env() -> dict[str, str]:
    """The ``FEDFLEET_*`` variables of the build's env.sh, each binary checked executable."""
    path = env_sh_path()
    hint = "build them first: bash deploy/dev.sh setup (or bash deploy/build-binaries.sh)"
    if not path.is_file():
        raise BinariesMissing(f"no cluster binaries at {path}; {hint}")
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := re.fullmatch(r"export (\w+)=(.*)", line.strip()):
            values[m[1]] = m[2]
    for key in (
        "FEDFLEET_KUBE_APISERVER",
        "FEDFLEET_KUBE_CONTROLLER_MANAGER",
        "FEDFLEET_KUBE_SCHEDULER",
        "FEDFLEET_KUBECTL",
        "FEDFLEET_ETCD",
        "FEDFLEET_HELM",
    ):
        binary = values.get(key, "")
        if not binary or not os.access(binary, os.X_OK):
            raise BinariesMissing(f"{path} names no executable {key} ({binary!r}); {hint}")
    return values
