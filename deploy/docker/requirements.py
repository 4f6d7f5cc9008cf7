"""Print the third-party requirements of pyproject.toml, one per line, for an image's deps layer.

Dockerfile.deps installs the dependencies alone (no fedfleet source), so that layer depends on
pyproject.toml's dependency lists only and a change to the Python sources does not reinstall
them; deploy/build-images.sh runs this same script on the host to key that layer by content.

    python3 requirements.py pyproject.toml [EXTRA[,EXTRA...]]

The project's own name in an extra ("fedfleet[operator]") is expanded in place. Standard
library only (tomllib, Python 3.11+): it runs in the bare base image before anything is
installed.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: dict[str, object], extras: list[str]) -> list[str]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    name = str(project["name"])
    optional = project.get("optional-dependencies", {})
    assert isinstance(optional, dict)
    self_ref = re.compile(rf"^{re.escape(name)}\s*\[([^\]]*)\]\s*$", re.IGNORECASE)
    out: list[str] = []
    seen: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            if m := self_ref.match(req):
                add_extras([e.strip() for e in m[1].split(",")])
            elif req not in out:
                out.append(req)

    def add_extras(names: list[str]) -> None:
        for extra in names:
            if not extra or extra in seen:
                continue
            if extra not in optional:
                raise SystemExit(f"requirements.py: pyproject.toml has no extra {extra!r}")
            seen.add(extra)
            add(list(optional[extra]))

    add(list(project.get("dependencies", [])))
    add_extras(extras)
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], "rb") as f:
        pyproject = tomllib.load(f)
    extras = argv[2].split(",") if len(argv) == 3 else []
    print("\n".join(requirements(pyproject, extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
