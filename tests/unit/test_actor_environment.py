"""Actor processes keep their bytecode in the cache when the caller forbids writing it."""

from __future__ import annotations

from fedfleet.local import actor_environment


def test_no_bytecode_setting_moves_the_actors_bytecode_to_the_cache() -> None:
    env = actor_environment({"PYTHONDONTWRITEBYTECODE": "1", "FEDFLEET_CACHE": "/c", "X": "y"})
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert env["PYTHONPYCACHEPREFIX"] == "/c/pycache"
    assert env["X"] == "y" and env["PYTHONUNBUFFERED"] == "1" and env["PYTHONSAFEPATH"] == "1"


def test_a_chosen_bytecode_prefix_and_the_default_are_left_alone() -> None:
    chosen = actor_environment({"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "/mine"})
    assert chosen["PYTHONDONTWRITEBYTECODE"] == "1" and chosen["PYTHONPYCACHEPREFIX"] == "/mine"
    default = actor_environment({})
    assert "PYTHONPYCACHEPREFIX" not in default and "PYTHONDONTWRITEBYTECODE" not in default
