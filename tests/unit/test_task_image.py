"""The Dockerfiles users build images from, checked without a container engine (none here).

What can be checked without building: that each Dockerfile starts from what the operator
expects (the services image of this release, nobody's uid as the pods run it), that every path
it copies exists in its build context, and that each shipped example is a build context
(tests/integration/test_custom_task.py runs the image's import layout).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from fedfleet.core.spec import DEFAULT_ACTOR_IMAGE

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
EXAMPLES = sorted(p for p in (REPO / "examples").iterdir() if (p / "fljob.yaml").is_file())


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(steps: list[tuple[str, str]]) -> dict[str, str]:
    return {
        name: value.strip('"')
        for word, rest in steps
        if word == "ARG"
        for name, _, value in [rest.partition("=")]
    }


def test_task_image_starts_from_this_releases_services_image_and_runs_as_nobody() -> None:
    steps = _instructions(DOCKER / "task.Dockerfile")
    assert _args(steps)["SERVICES_IMAGE"] == DEFAULT_ACTOR_IMAGE
    assert [rest for word, rest in steps if word == "FROM"] == ["${SERVICES_IMAGE}"]
    # The pods run as uid 65534 with a read-only root: the image must not need root.
    assert [rest for word, rest in steps if word == "USER"][-1] == "65534:65534"
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "PYTHONPATH=/opt/fedfleet/task" in env
    assert ("COPY", ". /opt/fedfleet/task") in steps


def test_services_image_copies_only_paths_that_exist() -> None:
    for name in ("Dockerfile.services", "Dockerfile.operator"):
        steps = _instructions(DOCKER / name)
        copies = [rest.split() for word, rest in steps if word == "COPY"]
        assert copies, name
        for *sources, _dest in copies:
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
        ignored = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        for *sources, _dest in copies:
            for src in sources:  # the per-Dockerfile ignore file must let them through
                assert f"!{src.rstrip('/')}/" in ignored or f"!{src}" in ignored, (name, src)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_each_example_is_a_task_image_build_context(example: Path) -> None:
    doc = yaml.safe_load((example / "fljob.yaml").read_text())
    module, _, _ = doc["spec"]["task"]["ref"].partition(":")
    assert (example / (module.replace(".", "/") + ".py")).is_file()
    requirements = example / "requirements.txt"
    if requirements.exists():
        for line in requirements.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                Requirement(line)  # pip would refuse what packaging refuses
