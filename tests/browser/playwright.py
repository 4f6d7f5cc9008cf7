"""Run a Node script that drives Debian's chromium with Playwright, from a browser test.

Setup installs both before pytest starts (``bash deploy/dev.sh setup``): ``chromium`` from
Debian and a pinned ``playwright-core`` from npm under the cache, exported as
``FEDFLEET_NODE_PATH`` (its ``node_modules``). playwright-core is the client library only; it
never downloads a browser, so the tests launch ``/usr/bin/chromium``. A script gets its
arguments as one JSON document in ``$FEDFLEET_BROWSER_ARGS`` and prints one JSON document (its
findings) as the last line of stdout; the test asserts on those.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM", "BrowserMissing", "node_path", "run_node_script"]

CHROMIUM = "/usr/bin/chromium"
_HINT = "install them first: bash deploy/dev.sh setup"


class BrowserMissing(RuntimeError):
    """Node, playwright-core or chromium is not installed."""


def node_path() -> str:
    """The ``node_modules`` folder that holds playwright-core."""
    candidates: list[Path] = []
    if explicit := os.environ.get("FEDFLEET_NODE_PATH"):
        candidates.append(Path(explicit))
    else:
        cache = os.environ.get("FEDFLEET_CACHE") or str(
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedfleet"
        )
        found = sorted((Path(cache) / "node").glob("playwright-core-*/node_modules"))
        candidates.extend(reversed(found))
    for path in candidates:
        if (path / "playwright-core" / "package.json").is_file():
            return str(path)
    raise BrowserMissing(f"playwright-core is not installed (FEDFLEET_NODE_PATH); {_HINT}")


def run_node_script(script: Path, args: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run ``script`` with node and return the JSON document it printed last."""
    node = shutil.which("node")
    if node is None:
        raise BrowserMissing(f"node is not on PATH; {_HINT}")
    if not os.access(CHROMIUM, os.X_OK):
        raise BrowserMissing(f"no chromium at {CHROMIUM}; {_HINT}")
    env = {
        **os.environ,
        "NODE_PATH": node_path(),
        "FEDFLEET_BROWSER_ARGS": json.dumps({"chromium": CHROMIUM, **args}),
    }
    proc = subprocess.run(
        [node, str(script)], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"{script.name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    found: dict[str, Any] = json.loads(lines[-1])
    return found
