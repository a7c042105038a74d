"""A browser's User-Agent header in words ("Firefox 121 on Linux") for security alerts.

ua-parser (the Python port of the uap-core rules that browserscope, Logstash and many others
use) is kept up to date by a monthly rules release (ua-parser-builtins); a hand-written regex
would misname browsers within months, and a wrong name in a security mail misleads.
"""

from __future__ import annotations

from functools import lru_cache

CLI_AGENT = "qpki-cli"


def _version(major: str | None, minor: str | None = None) -> str:
    if not major:
        return ""
    return f" {major}.{minor}" if minor and minor != "0" else f" {major}"


@lru_cache(maxsize=512)
def describe_user_agent(user_agent: str) -> str:
    """Words such as "Chrome 120 on Windows 10" or "Mobile Safari 17.1 on iOS 17.1 (iPhone)"."""
    raw = (user_agent or "").strip()
    if not raw:
        return "an unknown browser"
    if raw == CLI_AGENT:
        return "the qpki command line"
    # Imported on the first header to describe (a new-device sign-in, an alert mail, the
    # activity page): ua-parser and the PyYAML it loads cost every gunicorn worker about
    # 1 MB at start-up otherwise (benchmark B6); its rules are compiled on first use anyway.
    from ua_parser import parse

    result = parse(raw[:512])
    browser = result.user_agent
    if browser is None or browser.family == "Other":
        # Not echoed: the header is chosen by the client, and a security mail must not carry
        # text (such as a web address) that an attacker wrote.
        return "an unrecognised program"
    words = f"{browser.family}{_version(browser.major)}"
    os_ = result.os
    if os_ is not None and os_.family != "Other":
        words += f" on {os_.family}{_version(os_.major, os_.minor)}"
    device = result.device
    if device is not None and device.family not in ("Other", "Spider") and device.model:
        words += f" ({device.model})"
    return words
