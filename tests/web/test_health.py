"""/healthz and /readyz: no authentication, no redirects, JSON, and readiness that tells why."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from helpers import create_user, login


def test_healthz_answers_ok_without_a_session(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert response.headers["Cache-Control"] == "no-store"
    assert "Set-Cookie" not in response.headers


def test_readyz_is_ready_on_a_current_schema(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200 and response.get_json() == {"status": "ready"}


def test_readyz_refuses_a_schema_that_is_behind_or_ahead(app: Flask, client: FlaskClient) -> None:
    db = app.db_manager  # type: ignore[attr-defined]
    head = db.schema_state().head
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0002_mfa'"))
    behind = client.get("/readyz")
    assert behind.status_code == 503
    assert behind.get_json() == {
        "status": "unavailable",
        "reason": "database schema behind; run qpki migrate",
    }
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    assert client.get("/readyz").get_json()["reason"].startswith("database schema ahead")
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :h"), {"h": head})
    assert client.get("/readyz").status_code == 200
    assert client.get("/healthz").status_code == 200  # liveness never depended on it


def test_readyz_refuses_without_a_key_ring(app: Flask, client: FlaskClient) -> None:
    from qpki.auth.mfa import MFAManager

    app.mfa_manager = MFAManager(None)  # type: ignore[attr-defined]
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["reason"] == "key ring not loaded"


def test_probes_are_not_redirected_for_a_user_who_must_change_the_password(
    app: Flask, client: FlaskClient
) -> None:
    user = create_user(app, "pat")
    with app.db_manager.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(
            text("UPDATE users SET must_change_password = :t WHERE id = :id"),
            {"t": True, "id": user.id},
        )
    assert login(client, "pat").status_code == 302
    assert client.get("/").status_code == 302  # everything else goes to the password change
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
