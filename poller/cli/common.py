"""What every command shares: exit statuses, the one-line failure, the store, --shard."""

from __future__ import annotations

import dataclasses
import sys
from typing import NoReturn

import click

from poller.cli.terminal import echo
from poller.config.settings import Settings
from poller.engine.sharding import Shard, parse_shard
from poller.store import Store, open_database

# 0 ok, 1 something was not read or not delivered, 2 usage or configuration.
EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


def fail(message: str, status: int) -> NoReturn:
    echo(f"poller: error: {message}", err=True)
    sys.exit(status)


def open_store(settings: Settings) -> Store:
    return open_database(settings.database_url)


def _shard_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Shard | None:
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


shard_option = click.option(
    "--shard",
    metavar="K/N",
    callback=_shard_option,
    help="Deprecated: use schedule = adaptive, where replicas share the work. Handle only "
    "this replica's share of the organizations (POLLER_SHARD), e.g. 2/3.",
)


def sharded(settings: Settings, shard: Shard | None) -> Settings:
    """The settings with ``--shard`` applied; a shard is deprecated on the fixed schedule and
    meaningless on the adaptive one, whose replicas share one work queue."""
    settings = settings if shard is None else dataclasses.replace(settings, shard=shard)
    if settings.shard is None:
        return settings
    if settings.schedule == "adaptive":
        fail(
            "--shard / POLLER_SHARD does not apply to schedule = adaptive: its replicas share "
            "the work through the database; remove the shard",
            EXIT_USAGE,
        )
    echo(
        "poller: warning: --shard / POLLER_SHARD is deprecated and will be removed in the next "
        "release; use schedule = adaptive, where replicas share the work (README: Upgrading)",
        err=True,
    )
    return settings
