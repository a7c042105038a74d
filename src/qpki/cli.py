"""The ``qpki`` command: the group, its shared helpers, and the server and database commands
(migrate, run, backup, restore, cleanup); the other groups are in :mod:`qpki.commands`."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import click

from qpki.commands.common import (
    _app,
    _verbose,
)
from qpki.config import ConfigError, Settings

# The command groups live in qpki.commands, one module per concern: name -> (module, attribute).
COMMAND_GROUPS: dict[str, tuple[str, str]] = {
    "users": ("qpki.commands.users", "users"),
    "mfa": ("qpki.commands.users", "mfa"),
    "audit": ("qpki.commands.audit_keys", "audit"),
    "keys": ("qpki.commands.audit_keys", "keys"),
    "api-keys": ("qpki.commands.api_keys", "api_keys"),
    "policy": ("qpki.commands.policy", "policy"),
    "mail": ("qpki.commands.mail", "mail"),
}


class _LazyGroup(click.Group):
    """The root group; the groups of :data:`COMMAND_GROUPS` are imported when named.

    ``qpki run`` never uses them, and whatever the serving master imports, every gunicorn
    worker forked from it carries (about 0.8 MB each, benchmark B6). ``qpki --help`` still
    lists them all, with their help.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMAND_GROUPS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMAND_GROUPS and cmd_name not in self.commands:
            module, attribute = COMMAND_GROUPS[cmd_name]
            group: click.Command = getattr(importlib.import_module(module), attribute)
            self.add_command(group, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_LazyGroup,
    help="qPKI account security: password login with two-factor authentication.",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Also print the log lines of start-up (key ring, schema, mail) and of the command.",
)
def main(verbose: bool) -> None:
    """``verbose`` is read back by :func:`_verbose` from the root context."""


@main.command(help="Create, upgrade or roll back the database schema (safe to run repeatedly).")
@click.option(
    "--revision",
    default="head",
    show_default=True,
    help="Target revision; an older one rolls the schema back (before running older code).",
)
@click.option("--check", is_flag=True, help="Change nothing; exit 1 unless the schema is current.")
def migrate(revision: str, check: bool) -> None:
    from qpki.logging_setup import configure_logging
    from qpki.ops import schema
    from qpki.ops.startup import StartupError

    try:
        settings = Settings.from_env()
        # Only warnings (another migration holds the lock) unless -v; the result is printed
        # below.
        configure_logging(
            settings.log_level if _verbose() else "WARNING",
            json_lines=settings.log_json,
            instance=settings.instance_name,
        )
        if check:
            schema.check(settings)
            click.echo("Database schema is current.")
            return
        result = schema.migrate(settings, revision)
    except (ConfigError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None
    if result.before == result.after:
        click.echo(f"Database is at revision {result.after}; nothing to do.")
    else:
        click.echo(f"Database {result.direction} from {result.before} to {result.after}.")


def qpki_command() -> str:
    """The ``qpki`` command as it works from a new terminal, where the virtual environment is
    not activated: the script beside the running interpreter (``.venv/bin/qpki`` relative to
    the current directory when it is inside it, as the README has it, else its absolute path),
    or ``<python> -m qpki`` when no script was installed."""
    script = Path(sys.executable).parent / "qpki"
    if not script.exists():
        return f"{sys.executable} -m qpki"
    absolute = Path(os.path.abspath(script))
    try:
        relative = absolute.relative_to(Path.cwd())
    except ValueError:
        return str(absolute)
    return str(relative) if str(relative).startswith(".") else f"./{relative}"


def first_user_hint() -> str:
    """What ``qpki run`` says while there is no user: the command that creates the first one."""
    return (
        "No users yet. Create the first administrator in another terminal, in this directory:\n"
        f"  {qpki_command()} users create admin --email admin@example.org --role admin\n"
        "(it asks for the password twice)."
    )


def _say(settings: Settings, message: str) -> None:
    """Start-up news: a log record when logs are JSON (every line must be), else plain text."""
    if settings.log_json:
        logging.getLogger("qpki.cli").info(message.replace("\n", " "))
    else:
        click.echo(message, err=True)


@main.command(help="Serve the web application with gunicorn (migrating an SQLite database first).")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="QPKI_HOST")
@click.option(
    "--port", default=5000, show_default=True, type=click.IntRange(1, 65535), envvar="QPKI_PORT"
)
@click.option(
    "--workers", default=2, show_default=True, type=click.IntRange(1, 64), envvar="QPKI_WORKERS"
)
def run(host: str, port: int, workers: int) -> None:
    import subprocess

    from qpki.config import REDIS_STARTUP_TIMEOUT_SECONDS
    from qpki.ops.startup import StartupError, check_redis
    from qpki.server import serve

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if settings.database_url.startswith("sqlite"):
        # The embedded database is migrated on start (zero configuration), in a child
        # process so the serving processes never load Alembic. A shared database is not:
        # the check in _app() refuses a schema that is behind and names `qpki migrate`.
        child = subprocess.run(
            [sys.executable, "-m", "qpki", "migrate"],
            check=False,
            capture_output=True,
            text=True,
        )
        if child.returncode:
            sys.stderr.write(child.stderr)
            sys.exit(child.returncode)
    if settings.redis_url:
        try:
            check_redis(settings.redis_url, timeout=REDIS_STARTUP_TIMEOUT_SECONDS)
        except StartupError as exc:
            raise click.ClickException(str(exc)) from None
    from qpki.api.metrics_dir import prepare_multiprocess_dir

    # Before the app loads prometheus_client: every worker then counts into shared files.
    prepare_multiprocess_dir(settings.data_dir)
    app = _app(migrate=False, quiet=False)
    if app.auth_manager.count_users() == 0:  # type: ignore[attr-defined]
        _say(settings, first_user_hint())
    _say(settings, f"qPKI listening on http://{host}:{port} with {workers} worker(s)")
    serve(app, host=host, port=port, workers=workers)


# -- backups -----------------------------------------------------------------------------------
@main.command(help="Back up the database into DIR (a new, empty directory); keys only if asked.")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--keys-to",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write the keys here: a separate, empty directory outside DIR (a vault).",
)
@click.option(
    "--include-keys", is_flag=True, help="Write the keys into DIR/keys (beside the database)."
)
def backup(directory: Path, keys_to: Path | None, include_keys: bool) -> None:
    from qpki.ops import backup as ops_backup
    from qpki.ops.startup import StartupError

    try:
        result = ops_backup.backup(
            Settings.from_env(), directory, keys_directory=keys_to, include_keys=include_keys
        )
    except (ConfigError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None
    if result.command:
        click.echo(f"Ran: {result.command}")
    click.echo(f"Database (revision {result.revision}) backed up to {result.database_file}.")
    if result.keys_directory is None:
        click.echo(
            "Keys NOT included: keep them in your secret store, or write them to a separate "
            "place with --keys-to DIR. Without the keys the backup cannot be used."
        )
    else:
        click.echo(f"Keys ({', '.join(result.key_files)}) written to {result.keys_directory}.")


@main.command(help="Restore the database from a backup in DIR (stop every instance first).")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--keys-from",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Restore the key files into the data directory from this keys backup.",
)
@click.option("--force", is_flag=True, help="Replace a database (and key files) that exist.")
def restore(directory: Path, keys_from: Path | None, force: bool) -> None:
    from qpki.ops import backup as ops_backup
    from qpki.ops.startup import StartupError

    try:
        result = ops_backup.restore(
            Settings.from_env(), directory, keys_directory=keys_from, force=force
        )
    except (ConfigError, StartupError) as exc:
        raise click.ClickException(str(exc)) from None
    if result.command:
        click.echo(f"Ran: {result.command}")
    click.echo(f"Database restored (revision {result.revision}).")
    if result.key_files:
        click.echo(f"Key files restored: {', '.join(result.key_files)}.")
    if result.audit_head:
        click.echo(f"Audit trail: {result.audit_head}.")
    if result.environment_keys:
        click.echo(
            "Keys that came from the environment are in the keys backup's "
            f"{ops_backup.ENV_KEYS_FILE}: put {', '.join(result.environment_keys)} back into "
            "the service's environment or credentials."
        )
    click.echo("Next: qpki migrate (if this qPKI is newer), then qpki audit verify.")


# -- users -------------------------------------------------------------------------------------
@main.command(help="Delete expired setup sessions, old sessions and stale throttle rows.")
def cleanup() -> None:
    app = _app()
    counts = app.auth_manager.cleanup()  # type: ignore[attr-defined]
    click.echo(", ".join(f"{name}: {count} removed" for name, count in counts.items()))
