"""``qpki audit`` and ``qpki keys``: the audit chain and the key rings."""

from __future__ import annotations

import sys

import click

from qpki.auth.keys import KeyFileError
from qpki.commands.common import CLI_ACTOR, _app, _as_cli


@click.group(help="The audit trail.")
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
@click.group(help="Keys: generate new ones; rotate the MFA encryption key ring.")
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
