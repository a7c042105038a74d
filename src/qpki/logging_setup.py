"""Logging that cannot be forged or leak: one line per record, CR/LF escaped, optional JSON.

User-controlled text (a username with a newline, say) is escaped so it cannot start a fake log
line. Secrets are kept out by the callers: the service layer logs user ids, never codes,
passwords, secrets, URIs, keys or session tokens.

With several instances logging to one place, each JSON line names its instance
(``QPKI_INSTANCE_NAME``, the host name by default). gunicorn's own error and access lines go
through the same formatters (see :mod:`qpki.server`), so ``QPKI_LOG_JSON=1`` means *every*
line is JSON.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from datetime import UTC, datetime
from typing import Any

# Extra attributes a record may carry (the access log sets them); they become JSON fields.
ACCESS_FIELDS = (
    "remote_addr",
    "method",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "user_agent",
    "referrer",
)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class SafeTextFormatter(logging.Formatter):
    """Plain text, one physical line per record."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = _escape(record.getMessage())
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.message}"
        if record.exc_info:
            line += " | " + _escape(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (JSON escaping already keeps CR/LF inside the string)."""

    def __init__(self, instance: str | None = None) -> None:
        super().__init__()
        self.instance = instance or socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "instance": self.instance,
            "message": record.getMessage(),
        }
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                payload[name] = getattr(record, name)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=True)


class _DropBreachLines(logging.Filter):
    """Flask-Limiter logs every rejected request at INFO; under attack that floods the log
    (each rejection already answers 429), so those lines are dropped while its INFO line
    ``Rate limit storage recovered`` still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and "exceeded at endpoint" in str(record.msg))


def make_formatter(*, json_lines: bool, instance: str | None = None) -> logging.Formatter:
    return JsonFormatter(instance) if json_lines else SafeTextFormatter()


def configure_logging(
    level: str = "INFO", *, json_lines: bool = False, instance: str | None = None
) -> None:
    """Install one handler on the ``qpki`` logger (idempotent, so app factories can repeat).

    Flask-Limiter's logger gets the same handler at INFO so that both halves of a Redis outage
    reach the operator: the warning that the rate-limit storage is unreachable (in-memory
    fallback in use) and the ``Rate limit storage recovered`` line when it is back. Its line
    for every rejected request is filtered out (:class:`_DropBreachLines`).
    """
    formatter = make_formatter(json_lines=json_lines, instance=instance)
    for name, logger_level in (("qpki", level), ("flask-limiter", "INFO")):
        logger = logging.getLogger(name)
        logger.setLevel(logger_level)
        ours = [h for h in logger.handlers if getattr(h, "_qpki", False)]
        if ours:
            ours[0].setFormatter(formatter)
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler._qpki = True  # type: ignore[attr-defined]
        handler.setFormatter(formatter)
        if name == "flask-limiter":
            handler.addFilter(_DropBreachLines())
        logger.addHandler(handler)
        logger.propagate = name == "qpki"
