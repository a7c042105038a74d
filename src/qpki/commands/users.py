"""``qpki users`` and ``qpki mfa``: accounts and break-glass 2FA administration."""

from __future__ import annotations

from typing import Any

import click
from flask import Flask

from qpki.commands.common import CLI_ACTOR, _app, _as_cli, read_new_password


@click.group(help="Manage users.")
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
@click.group(help="Two-factor authentication administration.")
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
