"""The images' dependency layer installs exactly what pyproject.toml declares.

deploy/docker/Dockerfile.deps installs the requirements deploy/docker/requirements.py prints,
and the services and operator images then install the wheel with ``--no-deps`` on top
(deploy/build-images.sh). A requirement the script dropped would be missing from the images with
no error at build time, so the script is checked against pyproject.toml here, and the
Dockerfiles against the arguments the build script passes them.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
SCRIPT = DOCKER / "requirements.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedfleet_docker_requirements", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _run(*extras: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(REPO / "pyproject.toml"), *extras],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line]


def test_services_deps_are_the_projects_dependencies() -> None:
    assert _run() == _pyproject()["project"]["dependencies"]
    # The empty EXTRAS build argument Dockerfile.deps passes for the services image.
    assert _run("") == _pyproject()["project"]["dependencies"]


def test_operator_deps_add_the_operator_extra() -> None:
    project = _pyproject()["project"]
    operator = project["optional-dependencies"]["operator"]
    assert _run("operator") == project["dependencies"] + operator


def test_self_references_expand_and_each_requirement_appears_once() -> None:
    project = _pyproject()["project"]
    dev = _run("dev")
    assert not any(re.match(r"fedfleet\b", r) for r in dev)
    assert len(dev) == len(set(dev))
    for extra in ("operator", "torch", "keras"):  # dev names them as fedfleet[...]
        assert set(project["optional-dependencies"][extra]) <= set(dev)


def test_an_unknown_extra_is_refused() -> None:
    with pytest.raises(SystemExit, match="no extra 'nope'"):
        _module().requirements(_pyproject(), ["nope"])
    doc = {"project": {"name": "x", "dependencies": ["a"], "optional-dependencies": {}}}
    assert _module().requirements(doc, []) == ["a"]


@pytest.mark.parametrize("name", ["services", "operator"])
def test_dockerfiles_default_to_public_images_and_take_the_deps_image(name: str) -> None:
    text = (DOCKER / f"Dockerfile.{name}").read_text(encoding="utf-8")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    # Plain `docker build` installs the dependencies itself; the build script passes its deps image.
    assert "ARG DEPS_IMAGE=${PYTHON_IMAGE}" in text
    assert "FROM ${DEPS_IMAGE}\n" in text
    assert re.search(r"^USER 65534:65534$", text, re.MULTILINE)
    script = (REPO / "deploy" / "build-images.sh").read_text(encoding="utf-8")
    assert f"Dockerfile.{name}" in script
    for arg in ("PYTHON_IMAGE", "DEPS_IMAGE", "PIP_INSTALL_ARGS"):
        assert f"ARG {arg}=" in text
        assert f"--build-arg {arg}=" in script
