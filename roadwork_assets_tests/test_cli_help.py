"""Every option and argument of every `roadwork` subcommand says what it does."""

from __future__ import annotations

import argparse

import pytest

from roadwork_assets import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_has_help():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: (choice.help or "").strip() for choice in sub._choices_actions}
    assert set(helps) == set(sub.choices) and all(helps.values()), helps


@pytest.mark.parametrize("command", sorted(_subparsers(cli.build_parser())))
def test_every_option_has_help_text(command):
    parser = _subparsers(cli.build_parser())[command]
    missing = [action.option_strings or [action.dest] for action in parser._actions
               if not isinstance(action, argparse._HelpAction)
               and not (action.help or "").strip()]
    assert missing == [], f"roadwork {command}: no help text for {missing}"
    parser.format_help()  # every help string formats (no stray % in it)
