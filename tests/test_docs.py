"""The documented surface: every command has help, every README command exists."""

import re
import shlex

import click
import pytest
from click.testing import CliRunner

from notecoder.cli import main

from .conftest import REPO

README = (REPO / "README.md").read_text()


def _commands():
    return sorted(main.commands.items())


@pytest.mark.parametrize("name,command", _commands(), ids=lambda x: str(x))
def test_every_command_has_help(name, command):
    assert command.help and len(command.help) > 20, name
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{name} {param.opts[0]} has no help"


def _readme_invocations():
    """Each `notecoder SUB ...` or `jobs/code_notes.py ...` line in README blocks."""
    text = README.replace("\\\n", " ")
    for line in text.splitlines():
        if not line.startswith("    "):  # only the indented command blocks
            continue
        line = line.strip().split("  #")[0]
        m = re.search(r"(?:bin/)?notecoder (\S+)(.*)", line)
        if m and m.group(1) in main.commands or (m and m.group(1).startswith("-")):
            yield m.group(1), shlex.split(m.group(2))
        j = re.search(r"jobs/code_notes\.py(.*)", line)
        if j:
            yield "run", shlex.split(j.group(1))


def test_readme_names_real_commands_and_options():
    seen = 0
    for name, args in _readme_invocations():
        command = main.commands[name]
        known = {opt for p in command.params for opt in getattr(p, "opts", [])}
        used = {a.split("=")[0] for a in args if a.startswith("--")}
        assert used <= known, f"README uses {sorted(used - known)} with `{name}`"
        seen += 1
    assert seen >= 8


def test_readme_mentions_every_command():
    for name in main.commands:
        assert f"notecoder {name}" in README or name == "demo", name
