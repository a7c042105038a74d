"""``qpki policy``: per-role sign-in policies (the command line can always change one)."""

from __future__ import annotations

import click
from flask import Flask

from qpki.commands.common import CLI_ACTOR, _app, _as_cli


@click.group(help="Per-role sign-in policies: required 2FA, grace, remembered devices.")
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
