"""Constants and small helpers shared by the mail tests."""

from __future__ import annotations

import re
from email.message import EmailMessage

BASE_URL = "https://qpki.example.test"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"


def parts(message: EmailMessage) -> tuple[str, str]:
    """The text and HTML parts of a received mail."""
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def link_in(message: EmailMessage, path: str) -> str:
    """The single link to ``path`` in the text part (the path after the base URL)."""
    text, _html = parts(message)
    found = re.findall(re.escape(BASE_URL) + r"(" + re.escape(path) + r"[A-Za-z0-9_\-]+)", text)
    assert len(set(found)) == 1, f"expected one {path} link, found {found}"
    return str(found[0])
