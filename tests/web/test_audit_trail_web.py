"""The admin audit page and CSV export through AuditTrailService: bounded filters, streaming."""

from __future__ import annotations

import csv
import io

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from helpers import create_user, login, optional_2fa_for_admins, page
from qpki.audit.events import AuditEvent
from qpki.auth.services.audit_trail import (
    COUNT_CAP,
    EXPORT_BATCH,
    AuditFilters,
    AuditTrailService,
)
from qpki.clock import system_clock

BAD_FILTERS = [
    f"before={2**70}",
    "before=-5",
    "before=12abc",
    "until=9999-12-31",
    "since=9999-12-31",
    "since=0001-01-01",
    "until=2026-02-30",
    "since=yesterday",
]
MESSAGES = ("must be an event id", "must be between 1970-01-01 and 2999-12-31", "is not a date")


@pytest.fixture
def admin(app: Flask) -> FlaskClient:
    optional_2fa_for_admins(app)
    create_user(app, "root-admin", role="admin")
    client = app.test_client()
    assert login(client, "root-admin").status_code == 302
    return client


def _add_events(app: Flask, count: int) -> None:
    audit = app.auth_manager.audit  # type: ignore[attr-defined]
    with app.db_manager.transaction() as s:  # type: ignore[attr-defined]
        for i in range(count):
            audit.record(s, AuditEvent.USER_CHANGED, target_name=f"=cmd{i}")


@pytest.mark.parametrize("query", BAD_FILTERS)
def test_out_of_range_filters_answer_400_with_a_message(admin: FlaskClient, query: str) -> None:
    html = admin.get(f"/admin/audit?{query}")
    assert html.status_code == 400
    alert = page(html).select_one(".flash.error")
    assert alert is not None
    shown = alert.get_text(" ")
    assert any(m in shown for m in MESSAGES), shown
    assert page(html).select("tr.audit-event") == []

    export = admin.get(f"/admin/audit.csv?{query}")
    assert export.status_code == 400 and export.mimetype == "text/plain"
    assert export.get_data(as_text=True).strip() in shown


def test_largest_valid_values_answer_200(admin: FlaskClient) -> None:
    assert admin.get(f"/admin/audit?before={2**63 - 1}&until=2999-12-31").status_code == 200
    assert admin.get("/admin/audit.csv?since=1970-01-01&until=2999-12-31").status_code == 200


def test_csv_is_streamed_in_batches_and_complete(app: Flask, admin: FlaskClient) -> None:
    total_events = EXPORT_BATCH + 150
    _add_events(app, total_events - 3)  # + policy_changed, user_created and login_success
    response = admin.get("/admin/audit.csv", buffered=False)
    assert response.status_code == 200 and response.is_streamed
    chunks = list(response.response)  # type: ignore[arg-type]
    assert len(chunks) == total_events + 1  # one chunk per line: nothing was built up front
    rows = list(
        csv.reader(
            io.StringIO(
                b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks).decode()
            )
        )
    )
    assert rows[0][0] == "id" and len(rows) == total_events + 1
    ids = [int(r[0]) for r in rows[1:]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == total_events
    targets = {r[5] for r in rows[1:] if r[2] == "user_changed"}
    assert all(t.startswith("'=") for t in targets)  # formulas neutralised


def test_export_generator_reads_lazily(app: Flask) -> None:
    """The export is a generator reading one batch at a time as the consumer advances: rows
    deleted after a batch was read are absent from what follows, which a CSV built in memory
    up front would still contain."""
    _add_events(app, EXPORT_BATCH + 10)
    manager = app.auth_manager  # type: ignore[attr-defined]
    service = AuditTrailService(manager.db, manager.audit, system_clock)
    lines = service.export_csv(AuditFilters())
    assert next(lines).startswith("id,")
    first_batch = [next(lines) for _ in range(EXPORT_BATCH)]
    oldest_read = int(first_batch[-1].split(",", 1)[0])
    with app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text("DELETE FROM audit_events WHERE id < :i"), {"i": oldest_read - 3})
    rest = list(lines)
    assert [int(line.split(",", 1)[0]) for line in rest] == [oldest_read - i for i in (1, 2, 3)]


def test_page_counts_every_matching_event(app: Flask) -> None:
    _add_events(app, 60)
    manager = app.auth_manager  # type: ignore[attr-defined]
    service = AuditTrailService(manager.db, manager.audit, system_clock)
    first = service.page(AuditFilters(event="user_changed"))
    assert first.total == 60 and len(first.events) == 50 and first.next_before_id is not None
    second = service.page(AuditFilters(event="user_changed"), before_id=first.next_before_id)
    assert second.total == 60 and len(second.events) == 10 and second.next_before_id is None
    assert service.page(AuditFilters(username="nobody")).total == 0
    assert not first.total_capped


def test_a_page_counts_up_to_the_cap_and_says_there_are_more(
    app: Flask, admin: FlaskClient
) -> None:
    """Counting stops at COUNT_CAP (a count walks every match: B5's million events)."""
    _add_events(app, COUNT_CAP + 1)
    manager = app.auth_manager  # type: ignore[attr-defined]
    service = AuditTrailService(manager.db, manager.audit, system_clock)
    found = service.page(AuditFilters(event="user_changed"))
    assert (found.total, found.total_capped, len(found.events)) == (COUNT_CAP, True, 50)
    shown = page(admin.get("/admin/audit?event=user_changed")).find(id="audit-count")
    assert shown is not None and shown.get_text(" ", strip=True).startswith("500+ events")
