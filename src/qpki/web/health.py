"""Liveness and readiness for load balancers and service managers, without authentication.

``/healthz`` answers 200 while the process can serve HTTP at all, touching nothing else: a
load balancer or systemd watchdog that restarts on its failure must not restart every instance
because the shared database blinked. ``/readyz`` answers 200 only when this instance can do
real work — the database answers, its schema is the one this code expects, and the MFA key
ring is loaded — and 503 with a JSON reason otherwise, so a balancer takes the instance out of
rotation (and back in) by itself. Neither reveals versions, hosts or error texts.
"""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from werkzeug.wrappers import Response

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)

# Endpoints that must answer without a session, a password change or any redirect.
ENDPOINTS = frozenset({"health.healthz", "health.readyz"})


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/healthz")
def healthz() -> Response:
    return _no_store(jsonify(status="ok"))


def _not_ready(reason: str) -> Response:
    response = jsonify(status="unavailable", reason=reason)
    response.status_code = 503
    return _no_store(response)


@bp.get("/readyz")
def readyz() -> Response:
    db = current_app.db_manager  # type: ignore[attr-defined]
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        state = db.schema_state()
    except DBAPIError as exc:
        log.warning("readiness: database unreachable (%s)", type(exc.orig).__name__)
        return _not_ready("database unreachable")
    if state.status != "current":
        return _not_ready(f"database schema {state.status}; run qpki migrate")
    try:
        current_app.mfa_manager.fernet  # type: ignore[attr-defined]  # noqa: B018
    except (AttributeError, RuntimeError, OSError):
        return _not_ready("key ring not loaded")
    return _no_store(jsonify(status="ready"))
