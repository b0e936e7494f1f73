"""``lethe --help``: every command and option says what it does, in words for its user."""

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from worker.cli import build_parser
from worker.commands import TRAIN_OPTIONS
from worker.training import TrainConfig


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subcommand's parser, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from parsers(child)


def test_every_command_and_option_has_help_text() -> None:
    missing = []
    for parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                missing += [
                    f"{parser.prog} {name}" for name in action.choices if name not in helped
                ]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert not missing


def test_the_help_shows_no_internal_notes() -> None:
    """A module docstring used as a description shows its markup (``x``) and its reasons for
    the code's layout; the help speaks to the command's user."""
    for parser in parsers(build_parser()):
        text = parser.format_help()
        assert "``" not in text and "import" not in text, parser.prog


def test_the_defaults_train_shows_are_the_training_configs() -> None:
    train = next(p for p in parsers(build_parser()) if p.prog == "lethe train")
    shown = {}
    for action in train._actions:
        found = re.search(r"\(default ([^)]+)\)", action.help or "")
        if action.dest in TRAIN_OPTIONS and found:
            shown[TRAIN_OPTIONS[action.dest]] = found.group(1)
    config = TrainConfig()
    assert shown == {name: str(getattr(config, name)) for name in TRAIN_OPTIONS}


@pytest.mark.parametrize("module", ["torch", "tqdm"])
def test_the_command_loads_neither_torch_nor_tqdm_until_a_command_needs_them(module: str) -> None:
    """The API image runs `lethe keys` and `lethe serve` and has neither."""
    code = f"import sys, worker.cli; worker.cli.build_parser(); sys.exit({module!r} in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
