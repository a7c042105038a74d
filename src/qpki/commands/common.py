"""What every ``qpki`` command shares: building the app after the start-up checks, the
audit context of the command line, the quiet-unless-``-v`` rule, reading a new password."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import click
from flask import Flask

from qpki.audit.context import request_context
from qpki.auth.errors import AuthError
from qpki.auth.keys import KeyFileError
from qpki.config import ConfigError, Settings

CLI_ACTOR = "cli"
# Without -v a command's own output is its result; only errors are logged next to it.
QUIET_LOG_LEVEL = "ERROR"


def _verbose() -> bool:
    """Whether ``qpki -v`` was given (read from the root context, so every command sees it)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("verbose"))


def _app(migrate: bool = True, *, quiet: bool = True) -> Flask:
    """The app, after the start-up checks (qpki.ops.startup): keys, URL, reachability and
    schema. ``migrate`` lets the embedded SQLite database be migrated first; a shared database
    is never migrated here, only checked (``qpki migrate`` changes it). ``quiet`` keeps the
    log to errors unless ``-v`` was given (the server, ``qpki run``, logs as configured)."""
    from qpki.ops.startup import StartupError, prepare_database

    try:
        settings = Settings.from_env()
        if quiet and not _verbose():
            # A command prints its result alone; the start-up log lines (key ring, audit key,
            # mail transport) are for the server's log, or for `qpki -v ...`.
            settings = replace(settings, log_level=QUIET_LOG_LEVEL)
        prepare_database(settings, os.environ, migrate_sqlite=migrate)
        from qpki.app import create_app

        return create_app(settings)
    except (ConfigError, KeyFileError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None


@contextmanager
def _as_cli() -> Iterator[None]:
    with request_context(ip="", user_agent="qpki-cli", channel="cli"):
        try:
            yield
        except AuthError as exc:
            raise click.ClickException(exc.message) from None


def read_new_password() -> str:
    """The password of ``--password-stdin``: at a terminal, asked twice without echo; from a
    pipe, its first line (so scripts can pipe it in)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat the password: ") != first:
        raise click.ClickException("The passwords differ. Nothing was created.")
    return first
