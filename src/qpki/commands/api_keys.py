"""``qpki api-keys``: service keys of the JSON API."""

from __future__ import annotations

from typing import Any

import click

from qpki.commands.common import CLI_ACTOR, _app, _as_cli


@click.group("api-keys", help="Service keys of the JSON API (/api/v1).")
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
