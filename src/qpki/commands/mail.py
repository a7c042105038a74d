"""``qpki mail``: the outbox of security alerts and links."""

from __future__ import annotations

import sys

import click

from qpki.commands.common import _app


@click.group(help="The mail outbox: security alerts and password links waiting to be sent.")
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
