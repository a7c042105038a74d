"""The ``qpki`` command: migrate, run, users, mfa, cleanup, audit, keys."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from flask import Flask

from qpki.audit.context import request_context
from qpki.auth.errors import AuthError
from qpki.auth.keys import KeyFileError
from qpki.config import ConfigError, Settings

CLI_ACTOR = "cli"


def _app(migrate: bool = True) -> Flask:
    from qpki.app import create_app

    try:
        app = create_app(Settings.from_env())
    except (ConfigError, KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None
    if migrate:
        app.db_manager.migrate_database()  # type: ignore[attr-defined]
    return app


@contextmanager
def _as_cli() -> Iterator[None]:
    with request_context(ip="", user_agent="qpki-cli", channel="cli"):
        try:
            yield
        except AuthError as exc:
            raise click.ClickException(exc.message) from None


@click.group(help="qPKI account security: password login with two-factor authentication.")
def main() -> None:
    pass


@main.command(help="Create or upgrade the database schema (safe to run repeatedly).")
def migrate() -> None:
    app = _app(migrate=False)
    app.db_manager.migrate_database()  # type: ignore[attr-defined]
    click.echo(f"Database is at revision {app.db_manager.current_revision()}.")  # type: ignore[attr-defined]


@main.command(help="Serve the web application with gunicorn (migrating first).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
def run(host: str, port: int, workers: int) -> None:
    import subprocess

    from qpki.server import serve

    # Migrate in a child process, so the serving processes never load Alembic.
    if subprocess.run([sys.executable, "-m", "qpki", "migrate"], check=False).returncode:
        raise click.ClickException("Migration failed; see the messages above.")
    app = _app(migrate=False)
    if app.auth_manager.count_users() == 0:  # type: ignore[attr-defined]
        click.echo(
            "No users yet. Create the first administrator in another terminal with:\n"
            "  qpki users create admin --email admin@example.org --role admin --password-stdin\n"
            "(type the password, then press Enter and Ctrl-D).",
            err=True,
        )
    click.echo(f"qPKI listening on http://{host}:{port} with {workers} worker(s)", err=True)
    serve(app, host=host, port=port, workers=workers)


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
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def users_create(username: str, email: str, role: str, password_stdin: bool) -> None:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
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


@main.command(help="Delete expired setup sessions, old sessions and stale throttle rows.")
def cleanup() -> None:
    app = _app()
    counts = app.auth_manager.cleanup()  # type: ignore[attr-defined]
    click.echo(", ".join(f"{name}: {count} removed" for name, count in counts.items()))


# -- audit -------------------------------------------------------------------------------------
@main.group(help="The audit trail.")
def audit() -> None:
    pass


@audit.command("verify", help="Check the audit hash chain; exit 1 at the first broken link.")
def audit_verify() -> None:
    app = _app()
    manager = app.auth_manager  # type: ignore[attr-defined]
    with manager.db.transaction(write=False) as s:
        result = manager.audit.verify(s)
    if result.ok:
        click.echo(f"Audit chain intact: {result.checked} events verified.")
        return
    click.echo(
        f"Audit chain BROKEN at event id {result.broken_id} ({result.reason}); "
        f"{result.checked} events before it verified.",
        err=True,
    )
    sys.exit(1)


# -- keys --------------------------------------------------------------------------------------
@main.group(help="The MFA encryption key ring.")
def keys() -> None:
    pass


@keys.command("rotate", help="Add a new key and re-encrypt every stored secret under it.")
@click.option(
    "--retire-old",
    is_flag=True,
    help="Drop the old keys once everything decrypts with the newest alone.",
)
@click.option(
    "--reencrypt-only",
    is_flag=True,
    help="Only re-encrypt under the ring's first key (after adding a key to QPKI_MFA_KEY).",
)
def keys_rotate(retire_old: bool, reencrypt_only: bool) -> None:
    from cryptography.fernet import Fernet

    from qpki.audit.events import AuditEvent
    from qpki.auth.key_rotation import RotationError, reencrypt_all, undecryptable_with
    from qpki.auth.keys import key_file_path, read_key_file, write_key_file

    settings = Settings.from_env()
    app = _app()
    db = app.db_manager  # type: ignore[attr-defined]
    manager = app.auth_manager  # type: ignore[attr-defined]
    ring = app.mfa_manager.fernet  # type: ignore[attr-defined]
    path = key_file_path(settings.data_dir)
    if settings.mfa_key and not reencrypt_only:
        raise click.ClickException(
            "The key ring comes from QPKI_MFA_KEY, which this command cannot change. Put a new "
            "key first in QPKI_MFA_KEY (comma-separated, newest first), restart the servers, run "
            "`qpki keys rotate --reencrypt-only`, then remove the old key from QPKI_MFA_KEY."
        )
    try:
        if reencrypt_only:
            counts = reencrypt_all(db, ring)
            action = "reencrypted"
        elif retire_old:
            current = read_key_file(path)
            if len(current) == 1:
                click.echo("Only one key in the ring; nothing to retire.")
                return
            counts = reencrypt_all(db, ring)
            left = undecryptable_with(db, current[0])
            if left:
                raise click.ClickException(
                    "Not retiring: still encrypted under an old key: " + ", ".join(left[:5])
                )
            write_key_file(path, current[:1])
            action = "retired_old_keys"
        else:
            current = read_key_file(path)
            write_key_file(path, [Fernet.generate_key(), *current])
            counts = reencrypt_all(db, app.mfa_manager.fernet)  # type: ignore[attr-defined]
            action = "rotated"
    except RotationError as exc:
        raise click.ClickException(str(exc)) from None
    details = {
        "action": action,
        "totp_secrets": counts.totp_secrets,
        "backup_code_sets": counts.backup_code_sets,
        "setup_sessions": counts.setup_sessions,
    }
    with _as_cli(), db.transaction() as s:
        manager.audit.record(s, AuditEvent.KEYS_ROTATED, actor_name=CLI_ACTOR, details=details)
    summary = (
        f"{counts.totp_secrets} secrets, {counts.backup_code_sets} backup-code sets and "
        f"{counts.setup_sessions} pending setups re-encrypted under the newest key."
    )
    if action == "rotated":
        click.echo(
            f"New key added to {path}. {summary} Running servers pick up the new key "
            "file within a second. When you are ready: `qpki keys rotate --retire-old`."
        )
    elif action == "retired_old_keys":
        click.echo(f"{summary} Old keys retired; {path} now holds one key.")
    else:
        click.echo(summary)
