"""Every command's ``--help`` ends with 2-3 examples of that command whose options the command knows."""

from __future__ import annotations

import shlex

import click
import pytest
from click.testing import CliRunner

from mediround_cli.main import cli


def registered_commands() -> list[tuple[str, click.Command]]:
    """(path after ``mediround``, command) for every command of the group, subcommands of groups included."""
    found = []

    def walk(prefix: str, group: click.Group) -> None:
        context = click.Context(group)
        for name in group.list_commands(context):
            command = group.get_command(context, name)
            path = f"{prefix} {name}".strip()
            found.append((path, command))
            if isinstance(command, click.Group):
                walk(path, command)

    walk("", cli)
    return found


def example_lines(help_text: str) -> list[str]:
    """The lines after the last ``Examples:`` line, which must end the help."""
    lines = help_text.rstrip().splitlines()
    starts = [index for index, line in enumerate(lines) if line.strip() == "Examples:"]
    assert starts, "no Examples: block"
    return [line.strip() for line in lines[starts[-1] + 1:]]


def test_the_walk_finds_every_listed_command():
    paths = [path for path, _ in registered_commands()]
    assert {"synth", "validate", "build-dialogues", "train", "train-jcm", "infer", "eval", "export", "convert",
            "convert-llava", "doctor", "demo", "recipes", "recipes show"} <= set(paths)


@pytest.mark.parametrize("path,command", registered_commands(), ids=lambda value: value if isinstance(value, str) else "")
def test_help_ends_with_examples_of_that_command(path, command):
    result = CliRunner().invoke(cli, [*path.split(), "--help"])
    assert result.exit_code == 0, result.output
    examples = example_lines(result.output)
    assert 2 <= len(examples) <= 3, examples
    for example in examples:
        words = shlex.split(example, comments=True)
        assert words[: 1 + len(path.split())] == ["mediround", *path.split()], example
        if ">" in words:  # a shell redirection, not an argument
            words = words[: words.index(">")]
        # The command's own parser (no file checks, so the paths need not exist here) takes every word:
        # an unknown option, an option without its value or an extra argument fails.
        # A group leaves its subcommand and that one's words to the subcommand.
        context = click.Context(command, info_name=path)
        _, leftover, _ = command.make_parser(context).parse_args(words[1 + len(path.split()):])
        if isinstance(command, click.Group) and leftover:
            assert leftover[0] in command.list_commands(context), example
        else:
            assert leftover == [], f"{example}: unexpected {leftover}"
