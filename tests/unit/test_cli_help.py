"""Every option of every ``fedfleet`` subcommand explains itself in ``--help``."""

from __future__ import annotations

import argparse

import pytest

from fedfleet.cli import SUBCOMMANDS, build_parser

pytestmark = pytest.mark.unit


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def test_every_subcommand_is_in_the_parser() -> None:
    assert set(_subparsers(build_parser())) == set(SUBCOMMANDS)


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_option_has_help(command: str) -> None:
    parser = _subparsers(build_parser())[command]
    undocumented = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert not undocumented, f"fedfleet {command}: no help for {undocumented}"
    assert len(parser._actions) > 1  # --help and at least one argument of its own


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_renders(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fedfleet.cli import main

    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedfleet " + command)
