"""The public commands (the Makefile, the README and the workflows call them by these names)."""

import sys

import pytest

from conftest import ROOT, run

COMMANDS = ("serve", "compare", "preset", "seeds", "share", "smoke", "params")


@pytest.mark.parametrize("command", COMMANDS)
def test_each_public_command_answers_help(command):
    result = run([sys.executable, "-m", f"llmpipe.{command}", "--help"], cwd=ROOT)
    assert result.stdout.startswith(f"usage: python -m llmpipe.{command}"), result.stdout
