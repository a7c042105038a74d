"""Turn an outbox row into a subject, a text part and an HTML part.

Each kind has one template, ``templates/mail/<kind>.txt``, defining the blocks ``subject``,
``summary`` (what happened) and ``advice`` (what to do if it was not you). Two shared layouts
wrap those blocks with the greeting, when / from where, the link and the signature: one as
plain text, one as HTML (autoescaped), so the two parts can never say different things.
Rendering needs no Flask app, so the sender thread and the CLI use it as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from qpki.mail.alerts import LinkMail, MailKind
from qpki.mail.useragent import describe_user_agent

_LINK_LABELS = {
    LinkMail.PASSWORD_RESET_LINK.value: "Choose a new password",
    LinkMail.EMAIL_CHANGE_CONFIRM.value: "Confirm the new address",
}


@dataclass(frozen=True)
class RenderedMail:
    subject: str
    text: str
    html: str


def when_in_words(moment: datetime) -> str:
    """Like "Monday 30 November 2026 at 19:58 UTC" (no locale: servers differ, mails must not)."""
    moment = moment.astimezone(UTC)
    return f"{moment:%A} {moment.day} {moment:%B %Y at %H:%M} UTC"


def _block(env: Environment, template_name: str, block: str, context: dict[str, Any]) -> str:
    template = env.get_template(template_name)
    render = template.blocks.get(block)
    if render is None:
        raise LookupError(f"{template_name} has no block {block!r}")
    return "".join(render(template.new_context(context))).strip()


class MailRenderer:
    """Renders every kind of mail from the package's templates."""

    def __init__(self, product: str) -> None:
        self.product = product
        self.env = Environment(
            loader=PackageLoader("qpki", "templates"),
            autoescape=select_autoescape(enabled_extensions=("html",), default=False),
            undefined=StrictUndefined,  # a missing variable is a bug, not an empty sentence
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )

    def render(self, kind: MailKind, context: dict[str, Any]) -> RenderedMail:
        """The mail of ``kind``; ``context`` is what the Notifier stored in the outbox."""
        values = dict(context)
        values["product"] = self.product
        at = values.get("at")
        values["when"] = when_in_words(datetime.fromisoformat(at)) if at else ""
        values["browser"] = describe_user_agent(values.get("user_agent") or "")
        values["address"] = values.get("ip") or "an unknown address"
        values.setdefault("link", None)
        values["link_label"] = _LINK_LABELS.get(kind.value, "Open")
        name = f"mail/{kind.value}.txt"
        subject = _block(self.env, name, "subject", values)
        parts = {
            "summary": _block(self.env, name, "summary", values),
            "advice": _block(self.env, name, "advice", values),
        }
        layout = {**values, **parts, "subject": subject}
        text = self.env.get_template("mail/_layout.txt").render(layout)
        html = self.env.get_template("mail/_layout.html").render(layout)
        return RenderedMail(subject=f"{self.product}: {subject}", text=text, html=html)
