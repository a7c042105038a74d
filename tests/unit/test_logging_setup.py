"""Log lines cannot be forged with CR/LF, and JSON mode writes one object per line."""

from __future__ import annotations

import io
import json
import logging

import pytest

from qpki.logging_setup import JsonFormatter, SafeTextFormatter, configure_logging

FORGED = "mallory\r\n2026-01-01 00:00:00,000 INFO qpki.auth: admin logged in"


def _emit(formatter: logging.Formatter, message: str, *args: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("qpki.test.forge")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.warning(message, *args)
    return stream.getvalue()


@pytest.mark.parametrize("formatter", [SafeTextFormatter(), JsonFormatter()])
def test_crlf_in_user_text_stays_on_one_line(formatter: logging.Formatter) -> None:
    out = _emit(formatter, "failed login for %s", FORGED)
    assert out.count("\n") == 1 and "\r" not in out
    assert out.endswith("\n")


def test_json_lines_are_objects_with_the_message() -> None:
    out = _emit(JsonFormatter(), "failed login for %s", FORGED)
    record = json.loads(out)
    assert record["message"] == f"failed login for {FORGED}"
    assert record["level"] == "WARNING" and record["logger"] == "qpki.test.forge"


def test_exceptions_are_kept_on_the_same_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeTextFormatter())
    logger = logging.getLogger("qpki.test.exc")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        logger.exception("boom")
    assert stream.getvalue().count("\n") == 1 and "ValueError" in stream.getvalue()


def test_configure_logging_is_idempotent_and_switches_format() -> None:
    configure_logging("INFO", json_lines=False)
    configure_logging("INFO", json_lines=True)
    handlers = [h for h in logging.getLogger("qpki").handlers if getattr(h, "_qpki", False)]
    assert len(handlers) == 1 and isinstance(handlers[0].formatter, JsonFormatter)
    configure_logging("INFO", json_lines=False)
