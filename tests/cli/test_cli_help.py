"""Every command explains itself: --help with an example, --version, shell completion."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from poller import __version__
from poller.cli.main import cli


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


ALL_COMMANDS = [(), *command_paths(cli)]


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "poller")
def test_every_command_help_has_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    # The example uses the command itself, so it can be copied as it is.
    assert f"poller {' '.join(path)}".strip() in result.output


def test_the_operator_commands_are_registered() -> None:
    assert {"preview", "send-test", "health"} <= set(cli.commands)


def test_version_prints_the_package_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"poller, version {__version__}\n"


def test_bash_completion_script_is_generated_by_click() -> None:
    result = CliRunner().invoke(
        cli, [], prog_name="poller", env={"_POLLER_COMPLETE": "bash_source"}
    )
    assert result.exit_code == 0
    assert "_poller_completion()" in result.output and "complete -o nosort" in result.output
