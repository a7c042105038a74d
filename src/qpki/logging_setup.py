"""Logging that cannot be forged or leak: one line per record, CR/LF escaped, optional JSON.

User-controlled text (a username with a newline, say) is escaped so it cannot start a fake log
line. Secrets are kept out by the callers: the service layer logs user ids, never codes,
passwords, secrets, URIs, keys or session tokens.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


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

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=True)


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Install one handler on the ``qpki`` logger (idempotent, so app factories can repeat).

    Flask-Limiter's logger gets the same handler at WARNING: its warning that the Redis
    rate-limit storage is unreachable (and the in-memory fallback in use) must reach the
    operator, while its line for every rejected request would flood the log under attack.
    """
    formatter: logging.Formatter = JsonFormatter() if json_lines else SafeTextFormatter()
    for name, logger_level in (("qpki", level), ("flask-limiter", "WARNING")):
        logger = logging.getLogger(name)
        logger.setLevel(logger_level)
        ours = [h for h in logger.handlers if getattr(h, "_qpki", False)]
        if ours:
            ours[0].setFormatter(formatter)
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler._qpki = True  # type: ignore[attr-defined]
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        logger.propagate = name == "qpki"
