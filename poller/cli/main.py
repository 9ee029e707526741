"""The `poller` command line: the click group with the options every command shares, and the
bootstrap before any command runs (environment file, settings, logging).

The commands live in poller.cli.commands, one module per family; problems a user can cause or
fix end in one line on stderr and an exit status (poller.cli.common: 0 ok, 1 something was not
read or not delivered, 2 usage or configuration).
"""

from __future__ import annotations

import os
from typing import Any

import click

from poller import __version__
from poller.cekura.client import ApiError
from poller.cli.commands import cycle, emails, ops, orgs
from poller.cli.common import EXIT_INCOMPLETE, EXIT_USAGE, fail
from poller.cli.logs import configure_logging
from poller.cli.terminal import echo
from poller.config.envfile import read_env_file
from poller.config.settings import ConfigError, load_settings
from poller.store import DatabaseError, SchemaOutdated


class PollerGroup(click.Group):
    """Turns the errors a user can cause or fix into one line and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, SchemaOutdated) as exc:
            fail(str(exc), EXIT_USAGE)
        except (ApiError, DatabaseError) as exc:
            fail(str(exc), EXIT_INCOMPLETE)


@click.group(cls=PollerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="poller")
@click.option(
    "--config", "config_path", metavar="PATH", help="TOML settings file (or POLLER_CONFIG)."
)
@click.option(
    "--env-file",
    metavar="PATH",
    envvar="POLLER_ENV_FILE",
    help="NAME=VALUE lines in systemd's EnvironmentFile= format; the environment wins "
    "(or POLLER_ENV_FILE).",
)
@click.option("--api-url", help="Cekura API base URL (POLLER_API_URL).")
@click.option(
    "--database-url", help="SQLAlchemy URL of the alert-state database (POLLER_DATABASE_URL)."
)
@click.option("--log-format", type=click.Choice(["json", "console"]), help="POLLER_LOG_FORMAT.")
@click.option(
    "-v", "--verbose", count=True, help="More log output (-v debug, -vv the libraries' debug too)."
)
@click.option("-q", "--quiet", count=True, help="Less log output (-q warnings, -qq errors).")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: str | None,
    env_file: str | None,
    api_url: str | None,
    database_url: str | None,
    log_format: str | None,
    verbose: int,
    quiet: int,
) -> None:
    """Email an organization's admins once when its Cekura credits drop below its threshold.

    \b
    Example:
      POLLER_API_TOKEN=... POLLER_MAIL_FROM=alerts@example.com poller once
    """
    if env_file:
        # Into the process environment, as systemd would put them (so HTTPS_PROXY etc. work
        # too), but only where a variable is not already set: the environment wins.
        for name, value in read_env_file(env_file).items():
            os.environ.setdefault(name, value)
    flags = {"api_url": api_url, "database_url": database_url, "log_format": log_format}
    settings = load_settings(flags=flags, config_path=config_path)
    configure_logging(
        log_format=settings.log_format,
        verbosity=verbose - quiet,
        secrets=settings.secret_values(),
    )
    for warning in settings.warnings:
        echo(f"poller: warning: {warning}", err=True)
    ctx.obj = settings


for _command in (
    cycle.once,
    cycle.run,
    cycle.check,
    orgs.status,
    orgs.forecast_command,
    orgs.configure,
    emails.preview,
    emails.send_test,
    ops.health,
    ops.requeue,
    ops.db,
    ops.simulate,
):
    cli.add_command(_command)

main = cli
