"""The ``qpki`` command: migrate, run, users, mfa, cleanup, audit, keys."""

from __future__ import annotations

import getpass
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

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


@click.group(help="qPKI account security: password login with two-factor authentication.")
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


def read_new_password() -> str:
    """The password of ``--password-stdin``: at a terminal, asked twice without echo; from a
    pipe, its first line (so scripts can pipe it in)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat the password: ") != first:
        raise click.ClickException("The passwords differ. Nothing was created.")
    return first


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
@main.group(help="Manage users.")
def users() -> None:
    pass


@users.command("create", help="Create a user.")
@click.argument("username")
@click.option("--email", default="", help="Email address.")
@click.option(
    "--role",
    type=click.Choice(["admin", "operator", "viewer"]),
    default="viewer",
    show_default=True,
)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from standard input: its first line when piped; at a terminal, "
    "asked twice without echo.",
)
def users_create(username: str, email: str, role: str, password_stdin: bool) -> None:
    if password_stdin:
        password = read_new_password()
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    app = _app()
    with _as_cli():
        user = app.auth_manager.create_user(  # type: ignore[attr-defined]
            username, password, email, role, actor_name=CLI_ACTOR
        )
    click.echo(f"Created {user.role} {user.username} (id {user.id}).")


@users.command("list", help="List users with their role, state and 2FA status.")
def users_list() -> None:
    app = _app()
    rows = app.auth_manager.list_users()  # type: ignore[attr-defined]
    click.echo(f"{'ID':>4}  {'USERNAME':<24} {'ROLE':<9} {'ACTIVE':<7} {'2FA':<9} LOCKED")
    for r in rows:
        u = r.user
        click.echo(
            f"{u.id:>4}  {u.username:<24} {u.role:<9} {'yes' if u.is_active else 'no':<7} "
            f"{'enabled' if u.two_factor_enabled else 'disabled':<9} {'yes' if r.locked else 'no'}"
        )


def _user_id(app: Flask, username: str) -> Any:
    user = app.auth_manager.get_user(username=username)  # type: ignore[attr-defined]
    if user is None:
        raise click.ClickException(f"No user named {username!r}.")
    return user


@users.command("unlock", help="Lift the lock or back-off after failed sign-in attempts.")
@click.argument("username")
def users_unlock(username: str) -> None:
    app = _app()
    user = _user_id(app, username)
    with _as_cli():
        lifted = app.auth_manager.unlock_user(None, user.id, actor_name=CLI_ACTOR)  # type: ignore[attr-defined]
    click.echo(f"Unlocked {user.username}." if lifted else f"{user.username} was not locked.")


# -- mfa ---------------------------------------------------------------------------------------
@main.group(help="Two-factor authentication administration.")
def mfa() -> None:
    pass


@mfa.command("disable", help="Break-glass reset of a user's 2FA (audited as actor 'cli').")
@click.argument("username")
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
def mfa_disable(username: str, reason: str) -> None:
    app = _app()
    user = _user_id(app, username)
    with _as_cli():
        app.auth_manager.admin_disable_mfa(None, user.id, reason, actor_name=CLI_ACTOR)  # type: ignore[attr-defined]
    click.echo(f"Two-factor authentication disabled for {user.username}; their sessions ended.")


@mfa.command("status", help="Show a user's 2FA status and remaining backup codes.")
@click.argument("username")
def mfa_status(username: str) -> None:
    app = _app()
    user = _user_id(app, username)
    if not user.two_factor_enabled:
        click.echo(f"{user.username}: 2FA disabled")
        return
    with _as_cli():
        info = app.auth_manager.get_backup_codes_info(user.id)  # type: ignore[attr-defined]
    since = user.mfa_enabled_at.strftime("%Y-%m-%d %H:%M UTC") if user.mfa_enabled_at else "?"
    click.echo(
        f"{user.username}: 2FA enabled since {since}; "
        f"backup codes remaining: {info.remaining} of {info.total}"
    )
    from qpki.web.services import services_of

    keys = services_of(app).webauthn.keys_of(user.id)
    click.echo(f"  authenticator app: {'yes' if user.totp_secret else 'no'}")
    click.echo(f"  security keys: {len(keys)}")
    for key in keys:
        used = key.last_used_at.strftime("%Y-%m-%d %H:%M UTC") if key.last_used_at else "never"
        synced = ", synced passkey" if key.synced else ""
        click.echo(
            f"    {key.name}: added {key.created_at.strftime('%Y-%m-%d %H:%M UTC')}, "
            f"last used {used}{synced}"
        )


@main.command(help="Delete expired setup sessions, old sessions and stale throttle rows.")
def cleanup() -> None:
    app = _app()
    counts = app.auth_manager.cleanup()  # type: ignore[attr-defined]
    click.echo(", ".join(f"{name}: {count} removed" for name, count in counts.items()))


# -- audit -------------------------------------------------------------------------------------
@main.group(help="The audit trail.")
def audit() -> None:
    pass


@audit.command(
    "verify",
    help="Check the keyed audit chain and its head; exit 1 at the first bad event, "
    "or when events are missing from the end.",
)
def audit_verify() -> None:
    from qpki.auth.services.audit_trail import AuditTrailService

    app = _app()
    manager = app.auth_manager  # type: ignore[attr-defined]
    result = AuditTrailService(manager.db, manager.audit, manager.services.clock).verify()
    if result.ok:
        click.echo(f"Audit chain intact: {result.checked} events verified.")
        return
    if result.broken_id is not None:
        click.echo(
            f"Audit chain BROKEN at event id {result.broken_id} ({result.reason}); "
            f"{result.checked} events before it verified.",
            err=True,
        )
    else:
        click.echo(
            f"Audit chain BROKEN: {result.reason}; {result.checked} events verified.", err=True
        )
    sys.exit(1)


# -- keys --------------------------------------------------------------------------------------
@main.group(help="Keys: generate new ones; rotate the MFA encryption key ring.")
def keys() -> None:
    pass


@keys.command(
    "generate",
    help="Print one new key of each kind as NAME=value lines (for an env file or a secret "
    "store). Nothing is stored or changed.",
)
def keys_generate() -> None:
    from qpki.auth.keys import generate_keys

    for name, value in generate_keys().items():
        click.echo(f"{name}={value}")


@keys.command("rotate", help="Add a new MFA key and re-encrypt every stored secret under it.")
@click.option(
    "--retire-old",
    is_flag=True,
    help="Drop the old keys once everything decrypts with the newest alone.",
)
@click.option(
    "--reencrypt-only",
    is_flag=True,
    help="Only re-encrypt under the current primary key (after promoting a key in "
    "QPKI_MFA_KEY on every instance).",
)
def keys_rotate(retire_old: bool, reencrypt_only: bool) -> None:
    from qpki.auth.key_rotation import (
        KeyRotationService,
        KeySource,
        RotationError,
        RotationReport,
    )
    from qpki.clock import system_clock

    if retire_old and reencrypt_only:
        raise click.UsageError("Use either --retire-old or --reencrypt-only, not both.")
    app = _app()
    report: RotationReport | None
    try:
        service = KeyRotationService(
            app.db_manager,  # type: ignore[attr-defined]
            app.auth_manager.audit,  # type: ignore[attr-defined]
            system_clock,
            KeySource.from_settings(app.settings),  # type: ignore[attr-defined]
        )
        with _as_cli():
            if reencrypt_only:
                report = service.reencrypt(actor_name=CLI_ACTOR)
            elif retire_old:
                report = service.retire_old(actor_name=CLI_ACTOR)
            else:
                report = service.rotate(actor_name=CLI_ACTOR)
    except (RotationError, KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None
    if report is None:
        click.echo("Only one key in the ring; nothing to retire.")
        return
    summary = (
        f"Re-encrypted {report.totp_secrets} TOTP secrets, {report.backup_code_sets} "
        f"backup-code sets and {report.setup_sessions} pending setups; verified: all "
        f"{report.verified} stored secrets decrypt with the newest key alone."
    )
    if report.retried:
        summary += f" {report.retried} rows changed meanwhile and were re-encrypted again."
    if report.action == "rotated":
        click.echo(
            f"New key added to {report.key_file}. {summary} Running servers pick up the new "
            "key file within a second. When you are ready: `qpki keys rotate --retire-old`."
        )
    elif report.action == "retired_old_keys":
        click.echo(f"{summary} Old keys retired; {report.key_file} now holds one key.")
    else:
        click.echo(f"{summary} The older keys can now be removed from every instance.")


# -- api keys ----------------------------------------------------------------------------------
@main.group("api-keys", help="Service keys of the JSON API (/api/v1).")
def api_keys() -> None:
    pass


@api_keys.command("create", help="Create a key; it is printed once, alone, on standard output.")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    required=True,
    help="Comma-separated: verify, users:read, users:write, audit:read, metrics.",
)
@click.option("--expires-days", type=int, default=None, help="Expire after N days (1-3650).")
def api_keys_create(name: str, scopes: str, expires_days: int | None) -> None:
    from qpki.api import api_keys_of

    app = _app()
    with _as_cli():
        created = api_keys_of(app).create(
            name, scopes, expires_days=expires_days, actor_name=CLI_ACTOR
        )
    click.echo(created.secret)
    click.echo(
        f"Created API key {created.info.name!r} with scopes {', '.join(created.info.scopes)}. "
        "It is shown only this once: store it now.",
        err=True,
    )


@api_keys.command("list", help="List keys: name, prefix, scopes, state, expiry, last use.")
def api_keys_list() -> None:
    from qpki.api import api_keys_of
    from qpki.web.services import services_of

    app = _app()
    now = services_of(app).clock()

    def stamp(value: Any) -> str:
        return value.strftime("%Y-%m-%d %H:%M") if value else "-"

    click.echo(f"{'NAME':<24} {'PREFIX':<14} {'STATE':<8} {'EXPIRES':<17} {'LAST USED':<17} SCOPES")
    for k in api_keys_of(app).list_keys():
        click.echo(
            f"{k.name:<24} {k.prefix:<14} {k.state(now):<8} {stamp(k.expires_at):<17} "
            f"{stamp(k.last_used_at):<17} {','.join(k.scopes)}"
        )


@api_keys.command("revoke", help="Revoke a key now (its next request is refused).")
@click.argument("name")
def api_keys_revoke(name: str) -> None:
    from qpki.api import api_keys_of

    app = _app()
    with _as_cli():
        api_keys_of(app).revoke(name, actor_name=CLI_ACTOR)
    click.echo(f"Revoked API key {name!r}.")


# -- policies ----------------------------------------------------------------------------------
@main.group(help="Per-role sign-in policies: required 2FA, grace, remembered devices.")
def policy() -> None:
    pass


def _print_policies(app: Flask) -> None:
    from qpki.auth.policy import ComplianceState
    from qpki.web.services import services_of

    svc = services_of(app).policy
    counts = {c.policy.role: c.counts for c in svc.compliance()}
    click.echo(
        f"{'ROLE':<9} {'2FA':<9} {'GRACE':>6} {'KEY':<4} {'NEW-DEVICE':<10} {'REMEMBER':<9} "
        "COMPLIANT/GRACE/WAITING/OVERDUE"
    )
    for p in svc.policies():
        c = counts.get(p.role, {})
        tally = "/".join(
            str(c.get(ComplianceState(state), 0))
            for state in ("compliant", "in_grace", "waiting", "overdue")
        )
        click.echo(
            f"{p.role:<9} {'required' if p.require_2fa else 'optional':<9} "
            f"{str(p.grace_hours) + 'h':>6} {'yes' if p.require_phishing_resistant else 'no':<4} "
            f"{'2FA' if p.new_device_2fa else '-':<10} "
            f"{(str(p.remember_allowed_days) + 'd') if p.remember_allowed_days else 'never':<9} "
            f"{tally if p.requires_second_factor else '-'}"
        )


@policy.command("show", help="Show each role's policy and how many members comply.")
def policy_show() -> None:
    _print_policies(_app())


@policy.command("set", help="Change ROLE's policy (admin, operator or viewer); audited as 'cli'.")
@click.argument("role")
@click.option("--require-2fa/--no-require-2fa", default=None, help="Members must have 2FA.")
@click.option(
    "--grace-hours", type=int, default=None, help="Hours from first sign-in (0: at once)."
)
@click.option(
    "--require-phishing-resistant/--no-require-phishing-resistant",
    default=None,
    help="Members must have a passkey or security key.",
)
@click.option(
    "--new-device-2fa/--no-new-device-2fa",
    default=None,
    help="A sign-in from a new browser needs 2FA even where it is optional.",
)
@click.option(
    "--remember-days", type=int, default=None, help="Days a device may be remembered (0: never)."
)
def policy_set(
    role: str,
    require_2fa: bool | None,
    grace_hours: int | None,
    require_phishing_resistant: bool | None,
    new_device_2fa: bool | None,
    remember_days: int | None,
) -> None:
    from qpki.web.services import services_of

    app = _app()
    with _as_cli():
        services_of(app).policy.set_policy(
            role,
            actor=None,
            actor_name=CLI_ACTOR,
            require_2fa=require_2fa,
            grace_hours=grace_hours,
            require_phishing_resistant=require_phishing_resistant,
            new_device_2fa=new_device_2fa,
            remember_days=remember_days,
        )
    _print_policies(app)


# -- mail --------------------------------------------------------------------------------------
@main.group(help="The mail outbox: security alerts and password links waiting to be sent.")
def mail() -> None:
    pass


@mail.command("status", help="Count pending and failed mails; exit 1 when some failed for good.")
def mail_status() -> None:
    from qpki.mail.setup import mail_components

    components = mail_components(_app())
    state = components.sender.status()
    next_try = (
        f" (next try {state.next_attempt_at:%Y-%m-%d %H:%M:%S} UTC)"
        if state.next_attempt_at
        else ""
    )
    click.echo(f"Delivery: {components.transport.describe()}")
    click.echo(
        f"Outbox: {state.pending} pending{next_try}, {state.sending} being sent, "
        f"{state.failed} failed, {state.sent} sent."
    )
    if state.failed:
        click.echo(f"Last failure: {state.last_error}", err=True)
        click.echo("Fix the cause, then run: qpki mail retry", err=True)
        sys.exit(1)


@mail.command("retry", help="Send every pending and failed mail now, without waiting.")
def mail_retry() -> None:
    from qpki.mail.setup import mail_components

    components = mail_components(_app())
    sender = components.sender
    queued = sender.make_all_due(include_failed=True)
    report = sender.deliver_due(limit=10_000)
    state = sender.status()
    click.echo(
        f"{queued} mail(s) due; sent {report.sent}, {report.retrying} to retry later, "
        f"{report.failed} failed, {report.lost_races} taken by another sender. "
        f"Outbox now: {state.pending} pending, {state.failed} failed."
    )
    if report.retrying or report.failed:
        click.echo(
            f"Delivery through {components.transport.describe()} failed: "
            f"{state.last_error or 'see the log'}",
            err=True,
        )
        sys.exit(1)
