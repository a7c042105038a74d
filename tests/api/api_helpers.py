"""Small helpers of the JSON API tests."""

from __future__ import annotations

from typing import Any

from flask import Flask

from qpki.audit.models import AuditEventRecord


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def audit_rows(app: Flask, event: str) -> list[AuditEventRecord]:
    with app.db_manager.transaction(write=False) as s:  # type: ignore[attr-defined]
        return list(
            s.query(AuditEventRecord)
            .filter(AuditEventRecord.event == event)
            .order_by(AuditEventRecord.id)
        )


def problem(response: Any) -> dict[str, Any]:
    """The problem document of an error response (asserting its media type)."""
    assert response.mimetype == "application/problem+json", response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json(force=True)
    assert body["status"] == response.status_code
    assert body["type"].startswith("urn:qpki:problem:")
    return body
